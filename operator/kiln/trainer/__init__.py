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
                           "format": "csv"|"parquet", "labelColumn": "label"}``; ``uri`` may be
                           ``s3://bucket/key.csv`` (downloaded to the staging directory)
``KILN_OUTPUT_URI``        artifact root, ``file:///path``, ``/path`` or ``s3://bucket/prefix``
                           (required)
``KILN_MODEL_NAME``        artifact subdirectory (default ``model``)
``KILN_TRAININGJOB``       run directory name and resume key; lineage
``KILN_IMAGE``             image reference; lineage
``KILN_TERMINATION_LOG``   result file (default ``/dev/termination-log``)
``KILN_CHECKPOINT_DIR``    local checkpoint directory (default ``<output>/<model>/.checkpoints/<job>``)
``KILN_STAGING_DIR``       local scratch space for s3:// downloads and uploads (default
                           ``<tmp>/kiln-staging``; the operator sets ``/tmp/kiln-staging``, an
                           emptyDir)
``AWS_*``                  for s3:// URIs, read by boto3 itself (``kiln.storage``):
                           ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
                           ``AWS_ENDPOINT_URL``; none = the SDK's default chain (IRSA)
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

Object storage: with an ``s3://`` output the pod has no output volume. Rank 0 assembles the
artifact and every per-epoch checkpoint under ``KILN_STAGING_DIR`` exactly as on a volume, then
uploads them to the same layout in the bucket, completeness marker last (``metadata.json`` of an
artifact, ``state.json`` of a checkpoint: object stores have no rename). The reported
``artifactUri`` is the ``s3://`` prefix. After a gang restart (new pods, empty disks) rank 0
downloads the newest complete checkpoint from the bucket and sends it to the other ranks over the
process group. Storage failures name bucket, key and cause in the termination message (never
credentials): no such bucket or object and access denied exit 2, a store still unavailable after
botocore's retries exits 1 (the gang restart retries it).

Modules: ``config`` (flags/env), ``data`` (data sets, split, digest), ``distributed`` (process
group), ``loop`` (training), ``checkpoint`` (resume, bucket copies), ``output`` (artifact, upload,
termination log). All object-store I/O goes through ``kiln.storage``.
"""
