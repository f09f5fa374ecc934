"""Model monitoring: the reference profile stored in an artifact and data drift against it.

- :mod:`kiln.monitoring.profile`: ``profile.json``, what the training inputs and predictions
  looked like (written by ``kiln-train`` and ``kiln.sdk.save_model(reference=...)``);
- :mod:`kiln.monitoring.drift`: the statistics (PSI, two-sample Kolmogorov-Smirnov,
  normed Wasserstein, Jensen-Shannon, chi-squared, Z-test) and Evidently's default choice;
- :mod:`kiln.monitoring.monitor`: :class:`~kiln.monitoring.monitor.DriftMonitor`, the
  sliding window of served rows and the Prometheus gauges kiln-serve exports.

numpy and pydantic only (no torch, no scipy, no pandas): the SDK, the trainer and the model
server all import it.
"""
