"""Preference losses equal TRL's (test-only dependency `trl`): on the same tiny model and token ids, loraforge's
loss and its LoRA gradients equal TRL's to 1e-5 in fp32, with loraforge's batch padded (one row per sequence)
and packed (all sequences of the micro-batch in one row, per-sequence positions).

DPO (each loss variant) and KTO run TRL's own `DPOTrainer` / `KTOTrainer.compute_loss` on its own collators.
ORPO and SimPO live in `trl.experimental`; their trainers' loss methods (`ORPOTrainer.odds_ratio_loss`,
`CPOTrainer.cpo_loss`, `get_batch_logps` on full logits) are driven directly, since the ORPO trainer also
trains its NLL term on the prompt (loraforge never does; see objectives/orpo.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from loraforge.config import TaskType, config_from_dict  # noqa: E402
from loraforge.data.preference import KtoExample, PairExample  # noqa: E402
from loraforge.data.templates import IGNORE_INDEX, Encoded  # noqa: E402
from loraforge.objectives.preference import PreferenceLoss, collate_sequences  # noqa: E402

# Hand-made token ids (prompt, chosen, rejected): sides of different lengths so padding and packing both matter.
PAIRS = [([11, 12, 13, 14], [21, 22, 23], [31, 32]),
         ([41, 42], [51], [61, 62, 63, 64]),
         ([71, 72, 73], [81, 82, 83, 84, 85], [91, 92, 93])]
ATOL = 1e-5


def side(prompt: list[int], reply: list[int]) -> Encoded:
    return Encoded(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from loraforge.models.tiny import tiny_model_dir

    return tiny_model_dir("llama", tmp_path_factory.mktemp("pref_trl"))


def lora_model(model_dir: Path):
    """A tiny LoRA model whose adapter is not zero (a zero adapter makes every log-ratio 0)."""
    from peft import LoraConfig, get_peft_model

    from loraforge.models.loader import load_model

    torch.manual_seed(0)
    base = load_model(model_dir, TaskType.CAUSAL_LM, dtype="float32")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():  # PEFT's non-default init leaves B small: make the policy clearly differ from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.train()


def cfg_for(tmp_path: Path, **keys):
    data = tmp_path / "unused.jsonl"
    data.write_text(json.dumps({"instruction": "x", "chosen": "a", "rejected": "b"}) + "\n")
    return config_from_dict({"metadata_path": str(data), "method": "lora", **keys})


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return grads


def ours(model, cfg, losses, needs_reference, rows, pack: bool, pad_token_id: int, **extra):
    """loraforge's mean loss over the examples and its gradients."""
    loss = PreferenceLoss(model, cfg, losses, needs_reference)
    batch = {**collate_sequences(rows, pad_token_id, pack), **extra}
    total, n = loss(**batch)
    (total / n).backward()
    return (total / n).detach(), lora_grads(model), loss


def assert_same(a_loss, a_grads, b_loss, b_grads):
    torch.testing.assert_close(a_loss.float(), b_loss.float(), atol=ATOL, rtol=ATOL)
    assert a_grads.keys() == b_grads.keys()
    for name in a_grads:
        torch.testing.assert_close(a_grads[name], b_grads[name], atol=ATOL, rtol=ATOL, msg=name)


def trl_trainer(kind: str, model, tokenizer, tmp_path: Path, reference: str = "disabled", **args):
    """TRL's trainer on `model`. Given a PeftModel, TRL keeps a frozen copy of its adapter as the reference
    (adapter "ref", like loraforge's frozen copy for a continued adapter); `reference="disabled"` deletes it, so
    TRL's reference becomes the adapter-disabled base (its path for a fresh adapter, and loraforge's default)."""
    warnings.filterwarnings("ignore")
    from datasets import Dataset

    common = dict(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                  per_device_train_batch_size=len(PAIRS))
    if kind == "dpo":
        rows = [{"prompt": "hi", "chosen": " a", "rejected": " b"}] * 2
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common, **args),
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    else:
        rows = [{"prompt": "hi", "completion": " a", "label": True}, {"prompt": "ho", "completion": " b", "label": False}]
        trainer = trl.KTOTrainer(model=model, args=trl.KTOConfig(**common, **args),
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if reference == "copy":
        assert "ref" in trainer.model.peft_config
    elif "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
        assert list(trainer.model.peft_config) == ["default"]
    return trainer


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("reference", ["disabled", "copy"])
def test_dpo_equals_trl_dpo_trainer(variant, pack, reference, model_dir, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from loraforge.models.loader import load_tokenizer
    from loraforge.objectives.dpo import dpo_losses

    tokenizer = load_tokenizer(model_dir)
    model = lora_model(model_dir)
    cfg = cfg_for(tmp_path, stage="dpo", dpo_loss=variant, pref_beta=0.3,
                  pref_reference="auto" if reference == "disabled" else "copy")
    rows = [[side(p, c), side(p, r)] for p, c, r in PAIRS]
    mine = ours(model, cfg, dpo_losses, True, rows, pack, tokenizer.pad_token_id)
    assert (mine[2].ref_model is None) == (reference == "disabled")

    trainer = trl_trainer("dpo", model, tokenizer, tmp_path, reference, beta=0.3, loss_type=[variant])
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    assert_same(mine[0], mine[1], theirs.detach(), lora_grads(model))
    # TRL's logged rewards are β · log-ratio, as ours
    metrics = {k: (s / n).item() for k, (s, n) in mine[2].pop_metrics("train").items()}
    assert metrics["rewards/chosen"] == pytest.approx(trainer._metrics["train"]["rewards/chosen"][-1], abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(trainer._metrics["train"]["rewards/margins"][-1], abs=1e-5)


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_dpo_with_an_sft_term_equals_trl_sigmoid_plus_sft(pack, model_dir, tmp_path):
    """`dpo_sft_weight` α (RPO) = TRL's `loss_type: [sigmoid, sft]`, `loss_weights: [1, α]`: the chosen replies'
    token-mean NLL of the micro-batch added to DPO. Checked against α = 0 too, so the term is really there."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from loraforge.models.loader import load_tokenizer
    from loraforge.objectives.dpo import dpo_losses

    tokenizer = load_tokenizer(model_dir)
    model = lora_model(model_dir)
    rows = [[side(p, c), side(p, r)] for p, c, r in PAIRS]
    plain = ours(model, cfg_for(tmp_path, stage="dpo", pref_beta=0.3), dpo_losses, True, rows, pack,
                 tokenizer.pad_token_id)
    cfg = cfg_for(tmp_path, stage="dpo", pref_beta=0.3, rpo_alpha=0.7)  # TRL's old name, an alias
    assert cfg.dpo_sft_weight == 0.7
    mine = ours(model, cfg, dpo_losses, True, rows, pack, tokenizer.pad_token_id)
    total, count = mine[2].pop_metrics("train")["nll/chosen"]
    nll = (total / count).item()
    assert nll > 1 and mine[0].item() == pytest.approx(plain[0].item() + 0.7 * nll, abs=1e-5)

    trainer = trl_trainer("dpo", model, tokenizer, tmp_path, beta=0.3, loss_type=["sigmoid", "sft"],
                          loss_weights=[1.0, 0.7])
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS])
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    assert_same(mine[0], mine[1], theirs.detach(), lora_grads(model))


def test_dpo_sft_weight_belongs_to_dpo(tmp_path):
    from loraforge.preflight import _stage_checks

    problems = _stage_checks(cfg_for(tmp_path, stage="simpo", pref_ftx=0.5))
    assert problems and problems[0].key == "dpo_sft_weight" and "stage: dpo" in problems[0].fix
    assert not _stage_checks(cfg_for(tmp_path, stage="dpo", pref_ftx=0.5))


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reference", ["disabled", "copy"])
def test_kto_equals_trl_kto_trainer(pack, reference, model_dir, tmp_path):
    """KTO's reference point z = max(0, KL estimate) is clamped: the policy is moved both ways from the reference,
    so at least one of the two runs has z > 0 and the KL sequences really take part."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from loraforge.models.loader import load_tokenizer
    from loraforge.objectives.kto import collate_kto, kto_losses

    tokenizer = load_tokenizer(model_dir)
    cfg = cfg_for(tmp_path, stage="kto", pref_beta=0.2, kto_desirable_weight=1.3, kto_undesirable_weight=0.7,
                  batching="packed" if pack else "padded", base_model=str(model_dir),
                  pref_reference="auto" if reference == "disabled" else "copy")
    labels = [True, False, True]
    examples = [KtoExample(side(p, c if good else r), len(p), good) for (p, c, r), good in zip(PAIRS, labels)]
    batch = collate_kto(examples, [[0], [1], [2]], tokenizer.pad_token_id, cfg)
    assert ("position_ids" in batch) == pack
    replies = [e.encoded.input_ids[e.prompt_len:] for e in examples]
    trl_batch = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": e.encoded.input_ids[:e.prompt_len], "completion_ids": replies[k],
          "KL_completion_ids": replies[k - 1], "label": e.desirable} for k, e in enumerate(examples)])
    kls = []
    for sign in (1.0, -1.0):
        model = lora_model(model_dir)
        loss = PreferenceLoss(model, cfg, kto_losses, True)  # the frozen copy (reference="copy") is taken here
        trainer = trl_trainer("kto", model, tokenizer, tmp_path, reference, beta=0.2, desirable_weight=1.3,
                              undesirable_weight=0.7)
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():  # move the policy away from the reference, one way or the other
            for name, p in model.named_parameters():
                if "lora_B.default" in name:
                    p.mul_(sign) if reference == "disabled" else p.add_(sign * torch.randn(p.shape, generator=noise))
        total, n = loss(**batch)
        (total / n).backward()
        mine = ((total / n).detach(), lora_grads(model))
        theirs = trainer.compute_loss(trainer.model, trl_batch)
        theirs.backward()
        assert_same(mine[0], mine[1], theirs.detach(), lora_grads(model))
        kl = trainer._metrics["train"]["kl"][-1]
        total_kl, count = loss.pop_metrics("train")["kl"]
        assert (total_kl / count).item() == pytest.approx(kl, rel=1e-4, abs=1e-5)  # a detached metric: fp32 sums in another order
        kls.append(kl)
    assert max(kls) > 0


def full_logits_batch(rows):
    """TRL's experimental trainers' layout: chosen rows then rejected rows, right-padded, labels -100 on prompts."""
    return collate_sequences([[s] for s in [r[0] for r in rows] + [r[1] for r in rows]], 0, pack=False)


@pytest.mark.parametrize("stage", ["orpo", "simpo", "dpo_smoothed"])
@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_reference_free_losses_equal_trl(stage, pack, model_dir, tmp_path):
    """ORPO (odds-ratio term of `ORPOTrainer`, mean log-probs from its `get_batch_logps`), SimPO (`CPOTrainer`
    with loss_type simpo) and conservative DPO with label smoothing (CPO's smoothed sigmoid applied to the
    log-ratios, the same formula) — value and gradients."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from loraforge.objectives.dpo import dpo_losses
    from loraforge.objectives.orpo import orpo_losses
    from loraforge.objectives.simpo import simpo_losses

    model = lora_model(model_dir)
    rows = [[side(p, c), side(p, r)] for p, c, r in PAIRS]
    keys = {"orpo": dict(stage="orpo", orpo_lambda=0.25), "simpo": dict(stage="simpo", pref_beta=2.0, simpo_gamma=0.7,
            pref_label_smoothing=0.1), "dpo_smoothed": dict(stage="dpo", pref_beta=0.3, pref_label_smoothing=0.2)}[stage]
    cfg = cfg_for(tmp_path, **keys)
    fn = {"orpo": orpo_losses, "simpo": simpo_losses, "dpo_smoothed": dpo_losses}[stage]
    mine = ours(model, cfg, fn, stage == "dpo_smoothed", rows, pack, 0)

    device = SimpleNamespace(device=torch.device("cpu"))
    batch = full_logits_batch(rows)
    k = len(rows)

    def logps(average: bool):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average)

    if stage == "orpo":
        avg = logps(True)
        fake = SimpleNamespace(beta=0.25, accelerator=device)
        or_losses = ORPOTrainer.odds_ratio_loss(fake, avg[:k], avg[k:])[0]
        theirs = (-avg[:k] - or_losses).mean()  # NLL on the chosen reply (mean per token), minus λ·log σ(log odds)
    else:
        if stage == "simpo":
            lp, beta, gamma, eps = logps(True), 2.0, 0.7, 0.1
            chosen, rejected = lp[:k], lp[k:]
        else:
            lp, beta, gamma, eps = logps(False), 0.3, 0.0, 0.2
            with torch.no_grad(), model.disable_adapter():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                ref = ORPOTrainer.get_batch_logps(logits, batch["labels"])
            chosen, rejected = lp[:k] - ref[:k], lp[k:] - ref[k:]
        fake = SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=eps, alpha=0.0, accelerator=device,
                               loss_type="simpo" if stage == "simpo" else "sigmoid")
        theirs = CPOTrainer.cpo_loss(fake, chosen, rejected)[0].mean()
    theirs.backward()
    assert_same(mine[0], mine[1], theirs.detach(), lora_grads(model))
