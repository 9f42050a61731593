"""The resolved config a run saves (every default filled in) loads back unchanged, for every method."""

import pytest

from loraforge.config import config_from_dict, load_config, save_config

METHOD_EXTRAS = {"prompt": {"prompt_tuning_init": "text", "prompt_tuning_init_text": "Answer briefly:"}}


@pytest.mark.parametrize("method", ["lora", "qlora", "prefix", "ptuning", "prompt", "freeze", "full"])
def test_saved_config_loads_back(method, tmp_path):
    cfg = config_from_dict({"metadata_path": "x.jsonl", "method": method, **METHOD_EXTRAS.get(method, {})})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_image_options_round_trip(tmp_path):
    cfg = config_from_dict({"metadata_path": "m.jsonl", "task_type": "image-to-image", "image": {"resolution": 64}})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_validator_message_is_kept():
    from loraforge.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from_dict({"metadata_path": "m.jsonl", "task_type": "text-to-image", "image": {"caption_extension": "txt"}})
    assert "image.caption_extension: must start with a dot" in str(e.value)
