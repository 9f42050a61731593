"""Data pipeline: rows → messages (`formats`), messages → ids + labels (`templates`, the one loss-mask
function), batches (`batching`), train/val sets from a config (`dataset`), and their summary (`checks`).

Nothing is imported here so that `import loraforge.data.formats` stays free of torch and transformers.
"""
