"""Models: loading, GGUF import, the family registry, meta-device module discovery, inspection, tiny test models.

Import the submodule you need (`loraforge.models.registry`, `.discovery`, `.loader`, `.inspect`, `.tiny`,
`.gguf`); this package imports nothing so that `import loraforge.models` stays free of torch/transformers.
"""
