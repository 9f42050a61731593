"""`export --to gguf` of a real LoRA run on SmolLM2: time, file size, peak memory, and llama.cpp's agreement.

For each quant type, in a fresh process (so peak RSS is that export's alone): export the cached demo adapter
(`cardiology`) merged into SmolLM2, then run llama.cpp greedy on a few prompts from loraforge's prompt ids and
count the answers equal to loraforge's own `generate`. Peak RSS vs the fp32 model's size shows the export holds
one copy of the weights (tensors are converted and written one at a time).

    OMP_NUM_THREADS=2 python benchmarks/export_gguf.py --quants f16 bf16 q8_0 q4_0
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["What are the symptoms of high blood pressure?", "How are you today?", "Write one sentence about the sea.",
           "List three prime numbers.", "What is the capital of France?"]


def one(quant: str, out: Path) -> dict:
    """Runs in its own process: export, then compare answers with llama.cpp."""
    import numpy as np

    from loraforge.exporters import export
    from loraforge.models.gguf import resolve_model_path
    from loraforge.serve.demo import default_demo_dir, train_demo_adapters

    base = resolve_model_path("smollm2")
    run = train_demo_adapters(base, default_demo_dir(base))["cardiology"]
    start = time.perf_counter()
    export(run, "gguf", out, quant=quant, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = next(out.glob("*.gguf"))

    import llama_cpp

    from loraforge.inference import GenerationSettings, InferenceModel

    model = InferenceModel.load(base, {"cardio": str(run)})
    tok = model.tokenizer
    end = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, n_threads=2, logits_all=True)
    same = 0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        expected = model.generate(messages, "cardio", settings=GenerationSettings(max_new_tokens=24)).text
        llm.reset()
        llm.eval(model.prompt_ids(messages, "cardio"))
        new = []
        for _ in range(24):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if t in end:
                break
            new.append(t)
            llm.eval([t])
        same += tok.decode(new, skip_special_tokens=True).strip() == expected.strip()
    llm.close()
    return {"quant": quant, "seconds": round(seconds, 1), "size_mb": round(path.stat().st_size / 1e6, 1),
            "export_peak_rss_mb": round(peak_mb), "same_greedy_answers": f"{same}/{len(PROMPTS)}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quants", nargs="+", default=["f16", "bf16", "q8_0", "q4_0"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child[0], Path(args.child[1]))))
        return
    print("fp32 SmolLM2-135M weights: ~538 MB")
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants:
            res = subprocess.run([sys.executable, __file__, "--child", quant, f"{tmp}/{quant}"], capture_output=True,
                                 text=True, check=True)
            print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
