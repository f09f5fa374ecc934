"""The Kiln trainer: PyTorch DDP training that runs in ``images/trainer`` under torchrun.

Invocation (what the trainer image does; torchrun reads ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT`` for its own flags)::

    torchrun --no-python kiln-train [flags]

Without torchrun, ``kiln-train`` runs as one process (world size 1, no process group).

Environment (set by the operator; every one has a flag that overrides it, see ``kiln-train -h``):

=========================  ==================================================================
``KILN_HYPERPARAMETERS``   JSON object, keys of ``config.Hyperparameters`` (epochs,
                           learningRate, batchSize (global), hiddenSizes, seed, precision, ...)
``KILN_DATASET``           JSON: ``{"builtin": "sklearn-digits"}`` or ``{"uri": "/data/x.csv",
                           "format": "csv"|"parquet", "labelColumn": "label"}``
``KILN_OUTPUT_URI``        artifact root, ``file:///path`` or ``/path`` (required)
``KILN_MODEL_NAME``        artifact subdirectory (default ``model``)
``KILN_TRAININGJOB``       run directory name and resume key; lineage
``KILN_IMAGE``             image reference; lineage
``KILN_TERMINATION_LOG``   result file (default ``/dev/termination-log``)
``KILN_CHECKPOINT_DIR``    checkpoint directory (default ``<output>/<model>/.checkpoints/<job>``)
``KILN_FAIL_AFTER_EPOCH``  FAULT INJECTION FOR TESTS: exit 1 after this epoch's checkpoint
``KILN_FAIL_RANK``         ... only on this rank (default: every rank)
=========================  ==================================================================

FAULT INJECTION FOR ROLLBACK DRILLS: the hyperparameter ``servingFaultInjectionFailRate`` (a
number in [0, 1], default 0) does not change training; it is written into the artifact's weights
header (covered by the digest) and makes kiln-serve answer that fraction of requests with 500 on
purpose, so a deliberately broken version can be rolled out as a canary and rolled back.

Results: rank 0 writes ``<output>/<model>/<job>/`` (``kiln.artifact`` layout) and the
``TrainingResult`` JSON to the termination log; failures write ``kiln-train: ...`` there instead.
Exit codes: 0 success, 1 crash, 2 bad input.

Modules: ``config`` (flags/env), ``data`` (data sets, split, digest), ``distributed`` (process
group), ``loop`` (training), ``checkpoint`` (resume), ``output`` (artifact, termination log).
"""
