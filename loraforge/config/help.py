"""`loraforge config-help`: every key, its default and its description, section by section."""

from __future__ import annotations

from loraforge.config.image import ImageOptions
from loraforge.config.schema import (KEY_ALIASES, DataSection, MethodSection, ModelSection, OutputSection,
                                     PreferenceSection, TrainingSection)


def format_config_help() -> str:
    lines: list[str] = []
    sections = [("model", ModelSection), ("method", MethodSection), ("data", DataSection),
                ("training", TrainingSection), ("preference tuning", PreferenceSection), ("output", OutputSection), ("image (nested under `image:`)", ImageOptions)]
    for title, section in sections:
        lines.append(f"\n# {title}")
        for name, f in section.model_fields.items():
            default = f.default.value if hasattr(f.default, "value") else f.default
            lines.append(f"{name}: {default!r}\n    {f.description}")
    from loraforge.models.targets import PRESETS

    lines.append("\n# target_modules presets (resolved against the model's real layers; the family registry's "
                 "names when its code is not available)")
    lines += [f"{name}\n    {what}" for name, what in PRESETS.items()]
    aliases = ", ".join(f"{a} → {k}" for a, k in sorted(KEY_ALIASES.items()))
    lines.append(f"\n# accepted aliases\n{aliases}")
    return "\n".join(lines)
