"""Plugins: built-ins come through the entry-point group, a third-party package adds an architecture with
no change to core, and EXLCORE_PLUGINS limits what loads."""

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

import exlcore
from exlcore import plugins
from exlcore.cli import main
from tiny import make_tiny, max_error

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "exlcore-qwen2"


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Rebuild the plugin manager for one test, and again afterwards."""
    plugins.manager.cache_clear()
    yield monkeypatch
    plugins.manager.cache_clear()


@pytest.fixture
def qwen2_installed(tmp_path, fresh_plugins):
    """Install the example package the way pip lays it out: the module plus a dist-info with its entry point."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE / "exlcore_qwen2.py", site)
    info = site / "exlcore_qwen2-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exlcore-qwen2\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[exlcore]\nqwen2 = exlcore_qwen2\n")
    fresh_plugins.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("exlcore_qwen2", None)


def test_builtins_register_through_entry_points(fresh_plugins):
    table = plugins.architectures()
    for arch, plugin in [("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "llama"),
                         ("MixtralForCausalLM", "mixtral"), ("GemmaForCausalLM", "gemma"),
                         ("Gemma2ForCausalLM", "gemma"), ("Gemma3ForCausalLM", "gemma")]:
        assert table[arch][1] == plugin
        assert plugins.plugin_source(plugin).startswith("exlcore ")


def test_third_party_architecture_loads_without_core_changes(qwen2_installed, tmp_path, tiny_tokenizer_dir):
    ref = make_tiny("qwen2", tmp_path / "m", tiny_tokenizer_dir, config_class="Qwen2Config")
    assert "Qwen2ForCausalLM" in plugins.architectures()
    assert plugins.plugin_source("qwen2") == "exlcore-qwen2 0.1.0"
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    got = exlcore.load(tmp_path / "m", device="cpu").forward(ids)
    assert max_error(got, expected) < 1e-4


def test_exl_plugins_lists_architecture_and_source(qwen2_installed, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2ForCausalLM" in out and "qwen2 (exlcore-qwen2 0.1.0)" in out
    assert "LlamaForCausalLM" in out and "llama (exlcore 0.1.0)" in out


def test_allow_list_limits_plugins(fresh_plugins, tmp_path, tiny_tokenizer_dir):
    fresh_plugins.setenv("EXLCORE_PLUGINS", "llama")
    assert set(plugins.architectures()) == {"LlamaForCausalLM", "MistralForCausalLM"}
    make_tiny("gemma", tmp_path, tiny_tokenizer_dir)
    with pytest.raises(exlcore.ExlError, match="unknown architecture 'GemmaForCausalLM'.*entry-point group"):
        exlcore.load(tmp_path, device="cpu")


def test_runtime_registration(fresh_plugins):
    """A plugin object registered at runtime (as tests and notebooks do) serves its architecture, and overrides
    what was registered before it."""
    from exlcore.architectures import llama
    from exlcore.hookspecs import hookimpl
    from exlcore.spec import ArchitectureSpec

    class Alias:
        @hookimpl
        def register_architectures(self, register):
            register(ArchitectureSpec(("MyLlamaForCausalLM", "LlamaForCausalLM"), llama.parse_config, llama.build))

        @hookimpl
        def register_chat_templates(self, register):
            register("chatml", "{{ messages[0]['content'] }}")

    plugins.manager().register(Alias(), name="alias")
    table = plugins.architectures()
    assert table["MyLlamaForCausalLM"][1] == "alias" and table["LlamaForCausalLM"][1] == "alias"
    assert plugins.chat_templates()["chatml"] == "{{ messages[0]['content'] }}"
    assert plugins.plugin_source("alias") == "registered at runtime"
