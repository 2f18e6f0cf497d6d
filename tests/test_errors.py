"""Bad input: the API raises ExlError naming the file or tensor, and the CLI prints one line and exits 1."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import exlcore
from exlcore.cli import main
from tiny import make_tiny


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer_dir):
    folder = tmp_path_factory.mktemp("good")
    make_tiny("llama", folder, tiny_tokenizer_dir)
    return folder


def damaged(good, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    damage(folder)
    return folder


def truncate(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def corrupt_header(folder):
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at "
    f.write_bytes(bytes(data))


def wrong_shape(folder):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:100].clone()
    save_file(tensors, f)


def missing_tensor(folder):
    f = folder / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.2.self_attn.o_proj.weight"]
    save_file(tensors, f)


def set_config(**changes):
    def damage(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return damage


CASES = {
    "no config": (lambda f: (f / "config.json").unlink(), r"config.json: missing"),
    "malformed config": (lambda f: (f / "config.json").write_text("{oops"), r"config.json: not valid JSON"),
    "unknown architecture": (set_config(architectures=["FooForCausalLM"]),
                             r"unknown architecture 'FooForCausalLM' \(known: .*LlamaForCausalLM.*\); install a plugin"),
    "config missing key": (set_config(hidden_size=None), r"missing required key 'hidden_size'"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), r"no \*\.safetensors files"),
    "truncated": (truncate, r"model.safetensors: truncated safetensors file"),
    "corrupt header": (corrupt_header, r"model.safetensors: corrupt safetensors header"),
    "wrong shape": (wrong_shape, r"'model.layers.1.mlp.up_proj.weight' has shape \(100, 64\), expected \(128, 64\)"),
    "missing tensor": (missing_tensor, r"'model.layers.2.self_attn.o_proj.weight' not found"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), r"no tokenizer.json or tokenizer.model"),
    "bad head counts": (set_config(num_key_value_heads=3), r"4 attention heads, 3 key/value heads"),
    "bad rope": (set_config(rope_parameters={"rope_type": "wobbly", "rope_theta": 1e4}), r"rope type 'wobbly'"),
    "bad optional value": (set_config(rms_norm_eps="tiny"), r"'rms_norm_eps' = 'tiny' is not a valid float"),
}


def test_null_settings_take_their_defaults(good, tmp_path):
    """A null in config.json means unset, as transformers reads it."""
    nulls = set_config(max_position_embeddings=None, rms_norm_eps=None, rope_theta=None,
                       rope_parameters={"rope_type": "default", "rope_theta": None})
    cfg = exlcore.load(damaged(good, tmp_path, nulls), device="cpu").config
    assert (cfg.max_position_embeddings, cfg.norm_eps, cfg.rope.theta) == (4096, 1e-6, 10000.0)


def test_a_file_cut_short_after_indexing_names_the_tensor(good, tmp_path):
    from exlcore.weights import Weights

    folder = damaged(good, tmp_path, lambda f: None)
    weights = Weights(folder)
    truncate(folder)  # safetensors itself finds it too short now
    with pytest.raises(exlcore.ExlError, match=r"model.safetensors: tensor 'model.norm.weight' cannot be read"):
        weights.get("model.norm.weight")


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_raises_one_exception_type(case, good, tmp_path):
    damage, message = CASES[case]
    with pytest.raises(exlcore.ExlError, match=message):
        exlcore.load(damaged(good, tmp_path, damage), device="cpu")


@pytest.mark.parametrize("case", ["truncated", "unknown architecture", "no tokenizer", "wrong shape"])
def test_cli_prints_one_line(case, good, tmp_path, capsys):
    folder = damaged(good, tmp_path, CASES[case][0])
    assert main(["generate", "-m", str(folder), "-p", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("exl: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_missing_folder_and_bad_options(tmp_path, good, capsys):
    assert main(["info", "-m", str(tmp_path / "nope")]) == 1
    assert "no such model folder" in capsys.readouterr().err
    assert main(["generate", "-m", str(good), "-p", "hi", "--dtype", "float8"]) == 1
    assert "dtype 'float8' is not supported" in capsys.readouterr().err
    assert main(["chat", "-m", str(good), "--mode", "nonesuch", "--device", "cpu"]) == 1
    assert "--mode 'nonesuch' is unknown; registered modes: " in capsys.readouterr().err


@pytest.mark.parametrize("option,message", [
    (["--top-p", "0"], "sampling: top_p must be in (0, 1]"),
    (["--temperature", "-1"], "sampling: temperature must be >= 0"),
    (["--min-p", "1.5"], "sampling: min_p must be in [0, 1)"),
    (["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    (["--max-seq-len", "-4"], "max_seq_len must be at least 2 tokens"),
])
def test_bad_generation_options(option, message, good, capsys):
    assert main(["generate", "-m", str(good), "-p", "hi", "--device", "cpu", "--max-new-tokens", "8", *option]) == 1
    err = capsys.readouterr().err
    assert err == f"exl: error: {message}" + err[len("exl: error: ") + len(message):] and err.count("\n") == 1
