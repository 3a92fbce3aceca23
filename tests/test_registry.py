"""The plugin registry: decorators, entry points, and its errors."""

from __future__ import annotations

import textwrap

import pytest
import torch

import schedmoe
from schedmoe.errors import RegistryError
from schedmoe.ops import Expert
from schedmoe.registry import Registry, registry


def test_builtins_are_registered():
    assert "ffn" in registry("expert").names() and "swiglu" in registry("expert").names()
    assert registry("a2a").names()[:1] and "nccl" in registry("a2a").names()
    assert "none" in registry("compressor").names()
    assert "sequential" in registry("scheduler").names()
    assert "topk" in registry("gate").names()


def test_unknown_name_lists_registered_names():
    with pytest.raises(RegistryError, match=r"unknown expert 'nope'; registered experts: .*ffn.*swiglu"):
        registry("expert").get("nope")
    with pytest.raises(RegistryError, match="unknown a2a"):
        schedmoe.MoELayer(8, 4, 16, a2a="carrier-pigeon")
    with pytest.raises(RegistryError, match="unknown plugin kind"):
        registry("optimizer")


def test_register_twice_and_wrong_type():
    reg = Registry("compressor", "schedmoe.ops.codecs.compressor:Compressor")

    @reg.register("mine")
    class Mine(schedmoe.ops.NoCompression):
        pass

    assert reg.get("mine") is Mine
    reg.register("mine", Mine)  # the same class again is harmless (module re-import)

    class Other(schedmoe.ops.NoCompression):
        pass

    with pytest.raises(RegistryError, match="already registered"):
        reg.register("mine", Other)
    with pytest.raises(RegistryError, match="must be a subclass of .*Compressor"):
        reg.register("bad", torch.nn.Linear)
    with pytest.raises(RegistryError, match="must be a subclass"):
        reg.register("bad", lambda x: x)


def test_decorator_registered_expert_is_used_by_layer():
    @schedmoe.register_expert("test-negate")
    class Negate(Expert):
        def forward(self, x_ECM):
            return -x_ECM

    layer = schedmoe.MoELayer(8, 4, 16, top_k=1, capacity_factor=0.0, expert="test-negate")
    x = torch.randn(10, 8)
    y = layer(x)
    weight_T = torch.softmax(x @ layer.gate.wg_EM.t(), -1).max(-1).values
    torch.testing.assert_close(y, -x * weight_T[:, None])
    assert layer(x).shape == x.shape and isinstance(layer.experts, Negate)


PLUGIN = textwrap.dedent('''
    import torch
    from schedmoe.ops import Compressor, Expert, Wire

    class Doubler(Expert):
        """Every expert returns twice its input."""
        def forward(self, x_ECM):
            return 2 * x_ECM

    class Negate(Compressor):
        """Sends -x and negates it back; counts its calls."""
        codec_id = 200
        lossless = True
        fixed_size = True
        calls = 0
        def compress(self, x_P):
            Negate.calls += 1
            data = (-x_P).contiguous().view(-1).view(torch.uint8)
            return Wire(data, [data.numel() // x_P.shape[0]] * x_P.shape[0])
        def decompress(self, wire, spec):
            return -wire.data.view(spec.dtype).view(len(wire.sizes), *spec.shape)
''')


def test_entry_point_plugin_is_found_and_used(tmp_path, monkeypatch):
    (tmp_path / "schedmoe_test_plugin.py").write_text(PLUGIN)
    info = tmp_path / "schedmoe_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: schedmoe-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[schedmoe.plugins]\n"
        "expert.test-doubler = schedmoe_test_plugin:Doubler\n"
        "compressor.test-negate = schedmoe_test_plugin:Negate\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert "test-doubler" in registry("expert").names() or registry("expert").get("test-doubler")
    layer = schedmoe.MoELayer(8, 4, 16, top_k=2, capacity_factor=0.0, expert="test-doubler",
                              compressor="test-negate")
    assert type(layer.experts).__name__ == "Doubler"
    assert type(layer.codecs.dispatch).__name__ == "Negate"
    x = torch.randn(12, 8)
    torch.testing.assert_close(layer(x), 2 * x)  # dropless, normalised top-2 weights sum to 1
    assert type(layer.codecs.dispatch).calls == 2  # dispatch and combine
