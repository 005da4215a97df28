"""Bad inputs end in one clear line (`error: ...`, exit code 2), before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import T2IAdapter

from t2i_export.cli import main


def run_cli(capsys, *argv) -> str:
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_model_dir(capsys, tmp_path):
    err = run_cli(capsys, "pipeline", "--model", tmp_path / "nope", "--out", tmp_path / "out")
    assert "not a directory" in err
    assert not (tmp_path / "out").exists()


def test_model_dir_missing_component(capsys, zoo, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(zoo.model_dir, model)
    shutil.rmtree(model / "vae")
    err = run_cli(capsys, "pipeline", "--model", model, "--out", tmp_path / "out")
    assert "missing component directory vae/" in err


def test_not_a_pipeline_dir(capsys, zoo, tmp_path):
    err = run_cli(capsys, "pipeline", "--model", zoo.adapter_dirs["sketch"], "--out", tmp_path / "out")
    assert "no model_index.json" in err


@pytest.mark.parametrize("name", ["bad name", "a/b", "x.y", "ünï"])
def test_bad_adapter_name(capsys, zoo, tmp_path, name):
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--adapter", f"{name}={zoo.adapter_dirs['sketch']}", "--out", tmp_path / "o")
    assert "[A-Za-z0-9_-]" in err or "letters, digits" in err


def test_duplicate_adapter_name(capsys, zoo, tmp_path):
    a = f"x={zoo.adapter_dirs['sketch']}"
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--adapter", a, "--adapter", a, "--out", tmp_path / "o")
    assert "given twice" in err


def test_missing_adapter_dir(capsys, zoo, tmp_path):
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--adapter", f"s={tmp_path / 'none'}", "--out", tmp_path / "o")
    assert "--adapter s=" in err and "not a directory" in err


def test_adapter_channels_do_not_match_unet(capsys, zoo, tmp_path):
    torch.manual_seed(0)
    wrong = T2IAdapter(in_channels=3, channels=[8, 16, 16, 16], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter")
    wrong.save_pretrained(str(tmp_path / "wrong"))
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--adapter", f"w={tmp_path / 'wrong'}", "--out", tmp_path / "o")
    assert "adapter w: feature 1" in err and "adapter_residual_1" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_adapter_with_too_many_features(capsys, zoo, tmp_path):
    torch.manual_seed(0)
    wrong = T2IAdapter(in_channels=3, channels=[8, 8, 16, 16, 16], num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter")
    wrong.save_pretrained(str(tmp_path / "wrong"))
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--adapter", f"w={tmp_path / 'wrong'}", "--out", tmp_path / "o")
    # A feature beyond the down blocks is offered the mid-block slot (as T2I-Adapter-XL's 4th is);
    # here it does not fit it.
    assert "feature 4" in err and "adapter_residual_4" in err


def test_out_dir_not_a_graph_set(capsys, zoo, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--out", out)
    assert "refusing" in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_adapter_arg_without_equals(capsys, zoo, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--model", str(zoo.model_dir), "--adapter", "sketch", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "expected NAME=DIR" in capsys.readouterr().err


def test_cli_pipeline_happy_path(capsys, zoo, tmp_path):
    out = tmp_path / "set"
    code = main(["pipeline", "--model", str(zoo.model_dir), "--adapter", f"sk={zoo.adapter_dirs['sketch']}", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["name"] == "set" and [a["name"] for a in m["adapters"]] == ["sk"]
    assert main(["verify", str(out)]) == 0


def test_controlnet_arg_errors(capsys, zoo, tmp_path):
    base = ["pipeline", "--model", zoo.model_dir, "--out", tmp_path / "o"]
    err = run_cli(capsys, *base, "--controlnet", f"c={tmp_path / 'none'}")
    assert "--controlnet c=" in err and "not a directory" in err
    err = run_cli(capsys, *base, "--controlnet", f"c={zoo.adapter_dirs['sketch']}")
    assert "is a 'T2IAdapter', expected 'ControlNetModel'" in err
    c = f"c={zoo.controlnet_dirs['canny']}"
    err = run_cli(capsys, *base, "--controlnet", c, "--controlnet", c)
    assert "controlnet name 'c' is given twice" in err
    err = run_cli(capsys, *base, "--controlnet", f"a b={zoo.controlnet_dirs['canny']}")
    assert "controlnet name 'a b' is invalid" in err
    assert not (tmp_path / "o").exists()


def test_controlnet_of_another_base_model(capsys, zoo, tmp_path):
    from diffusers import UNet2DConditionModel

    from t2i_export.tiny import SDXL_UNET_CONFIG, UNET_CONFIG, build_controlnet

    # SD 2.x-like: another text width.
    other = UNet2DConditionModel(**dict(UNET_CONFIG, cross_attention_dim=8))
    build_controlnet(other, 0).save_pretrained(str(tmp_path / "wide"))
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--controlnet", f"c={tmp_path / 'wide'}", "--out", tmp_path / "o")
    assert "cross_attention_dim 8 != the UNet's 4" in err
    # Same text width, other blocks.
    other = UNet2DConditionModel(**dict(UNET_CONFIG, block_out_channels=(8, 8, 16, 32)))
    build_controlnet(other, 0).save_pretrained(str(tmp_path / "blocks"))
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--controlnet", f"c={tmp_path / 'blocks'}", "--out", tmp_path / "o")
    assert "residual control_down_" in err and "block_out_channels" in err
    # An SDXL ControlNet (text_time conditioning) for an SD 1.x model.
    xl = UNet2DConditionModel(**dict(SDXL_UNET_CONFIG, cross_attention_dim=4, projection_class_embeddings_input_dim=52))
    build_controlnet(xl, 0).save_pretrained(str(tmp_path / "xl"))
    err = run_cli(capsys, "pipeline", "--model", zoo.model_dir, "--controlnet", f"c={tmp_path / 'xl'}", "--out", tmp_path / "o")
    assert "SDXL ControlNet needs an SDXL base model" in err
    assert not (tmp_path / "o").exists()
