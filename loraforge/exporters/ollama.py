"""`export --to ollama`: the GGUF plus a `Modelfile` whose TEMPLATE renders prompts as the run's chat template.

The TEMPLATE is written from the template's per-message blocks (`chat_format.decompose`, which proves the
blocks reproduce the run's rendering for system / multi-turn / generation-prompt conversations), and each of
the template's end-of-turn tokens becomes a `PARAMETER stop` line — a Modelfile without them runs on past
`<|im_end|>`, the most common Ollama complaint about fine-tuned models.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.errors import LoraforgeError, Problem
from loraforge.exporters.base import Exporter, ExportRequest, ExportResult, output_dir


def modelfile_text(gguf_name: str, template: str, stops: list[str], *, source: str) -> str:
    """A Modelfile: FROM the GGUF next to it, TEMPLATE, one PARAMETER stop line per end-of-turn token."""
    if '"""' in template:
        raise LoraforgeError([Problem("template", 'the chat template contains """, which ends a Modelfile block',
                                      fix="write the Modelfile's TEMPLATE by hand")], title="cannot write Modelfile")
    lines = [f"# written by `loraforge export --to ollama` from {source}", f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


def _run(request: ExportRequest) -> ExportResult:
    from loraforge.atomic import atomic_write_text
    from loraforge.exporters.chat_format import go_template
    from loraforge.exporters.gguf import write_model_gguf

    with output_dir(request) as tmp:
        model = write_model_gguf(request, Path(tmp), target="ollama")
        if model.chat_format is None:
            raise model.chat_format_error or RuntimeError("no chat format")
        text = modelfile_text(model.path.name, go_template(model.chat_format), model.stop_tokens,
                              source=str(request.run_dir))
        atomic_write_text(Path(tmp) / "Modelfile", text)
    name = (request.name or Path(request.run_dir).resolve().name).lower()
    return ExportResult(request.out, [request.out / model.path.name, request.out / "Modelfile"],
                        [f"wrote {request.out / model.path.name} and {request.out / 'Modelfile'}",
                         f"stop tokens: {', '.join(model.stop_tokens)}",
                         f"next: cd {request.out} && ollama create {name} -f Modelfile && ollama run {name}"])


EXPORTER = Exporter("ollama", "GGUF + Modelfile (TEMPLATE = the run's chat template, PARAMETER stop lines)", _run)
