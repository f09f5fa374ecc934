"""Pure builders: a custom resource (dict) -> the child manifests (dicts) it wants. No I/O."""
