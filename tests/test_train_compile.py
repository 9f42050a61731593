"""`torch_compile: true` compiles the module the loss really calls, in place, and trains exactly like eager.

The fused LM-head loss calls the backbone and the head separately, so compiling the whole model (what a
`torch.compile(model)` wrapper does) would compile nothing on the default path; these tests pin that down.
"""

import pytest

from test_train_helpers import (adapter, assert_losses_close, build, make_cfg, max_weight_diff,  # noqa: F401
                                rows_file, run, tiny_llama, train_losses)


def _built(tiny_llama, rows_file, tmp_path, **overrides):
    return build(make_cfg(tiny_llama, rows_file, tmp_path, torch_compile=True, **overrides), tiny_llama)


def test_compile_targets_the_backbone_on_the_fused_loss_path(tiny_llama, rows_file, tmp_path):
    model, loss, _ = _built(tiny_llama, rows_file, tmp_path)
    backbone, _head = loss.backbone_and_head()
    assert backbone._compiled_call_impl is not None
    assert model._compiled_call_impl is None  # the PeftModel itself is never called on this path
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_compile_targets_the_model_when_the_loss_calls_it(tiny_llama, rows_file, tmp_path):
    model, loss, _ = _built(tiny_llama, rows_file, tmp_path, chunked_loss=False)
    assert loss.backbone_and_head() is None
    assert model._compiled_call_impl is not None


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_llama, rows_file, tmp_path):
    kw = dict(max_steps=3, target_modules="all-linear")
    run(tiny_llama, rows_file, tmp_path / "eager", **kw)
    result = run(tiny_llama, rows_file, tmp_path / "compiled", torch_compile=True, **kw)
    assert result.global_step == 3
    assert_losses_close(train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager"), tol=1e-4)
    eager, compiled = adapter(tmp_path / "eager"), adapter(tmp_path / "compiled")
    assert compiled.keys() == eager.keys()  # saved with plain PEFT keys, no `_orig_mod.` prefix
    assert max_weight_diff(compiled, eager) < 1e-4
