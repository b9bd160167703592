"""The model zoo's own test (tests/support/zoo.py): every MoE model type of
the installed mlx-lm builds tiny and runs stock on the CPU, with its experts
in float32 and quantized at 3 and 4 bits.

The fused-expert comparison builds on these models; this file checks the
harness itself: the type list is complete, the models are deterministic and
not degenerate, the cached decode is right, and quantizing the experts
touches the experts only.
"""

import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchMLP

from support import zoo

RUNNABLE = [t for t in zoo.MOE_MODEL_TYPES if t not in zoo.CPU_IMPOSSIBLE]

# Round-to-nearest at 4 bits moves each expert projection's output by ~9% of
# its size, at 3 bits by ~20%; over 2-4 layers, with some routing flips, the
# logits move by up to ~0.4 (4 bits) and ~0.55 (3 bits) in the zoo. The bounds
# catch a broken quantization: an unrelated model is ~1.4 away.
MAX_QUANT_ERR = {4: 0.5, 3: 0.75}
MIN_QUANT_ERR = 1e-3


def rel_err(a, ref) -> float:
    """Normwise relative error ||a - ref|| / ||ref||."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def logits(pair) -> np.ndarray:
    """Prefill and decode logits as one [tokens + 1, V] array."""
    prefill, decode = pair
    return np.concatenate([np.array(prefill[0]), np.array(decode[0])])


def projections(experts):
    """(name, projection) of an expert module: gate/up/down or fc1/fc2."""
    gated = isinstance(experts, SwitchGLU)
    names = ("gate_proj", "up_proj", "down_proj") if gated else ("fc1", "fc2")
    return [(n, experts[n]) for n in names]


@pytest.fixture
def expert_calls(monkeypatch):
    """(module id, indices) of every SwitchGLU / SwitchMLP call."""
    calls = []
    for cls in (SwitchGLU, SwitchMLP):

        def record(self, x, indices, _call=cls.__call__):
            calls.append((id(self), np.array(indices)))
            return _call(self, x, indices)

        monkeypatch.setattr(cls, "__call__", record)
    return calls


def test_zoo_lists_every_moe_type_of_the_installed_mlx_lm():
    assert list(zoo.MOE_MODEL_TYPES) == zoo.scan_moe_model_types()
    assert set(zoo.CPU_IMPOSSIBLE) <= set(zoo.MOE_MODEL_TYPES)


@pytest.mark.parametrize("model_type", RUNNABLE)
def test_stock_model(model_type, expert_calls):
    with mx.stream(mx.cpu):
        model, _ = zoo.build(model_type, seed=0)
        params = tree_flatten(model.parameters())
        for path, p in params:
            if mx.issubdtype(p.dtype, mx.floating):
                # Router weights and biases that mlx-lm starts at zero are
                # random too, so top-k routing never decides a tie.
                assert mx.any(p != 0).item(), f"{model_type}: {path} is all zeros"
        experts = zoo.expert_modules(model)
        assert experts, f"{model_type}: no SwitchGLU/SwitchMLP in the model"
        for path, e in experts:
            for name, proj in projections(e):
                # Every expert projection quantizes at group size 64.
                num_experts, out_dims, in_dims = proj.weight.shape
                assert in_dims % 64 == 0 and out_dims % 64 == 0, f"{path}.{name}"
                assert 4 <= num_experts <= 8, f"{path}.{name}"

        expert_calls.clear()
        stock = zoo.run(model)
        prefill, decode = stock
        vocab = prefill.shape[-1]
        assert prefill.shape == (1, len(zoo.PROMPT), vocab)
        assert decode.shape == (1, 1, vocab)
        assert np.all(np.isfinite(logits(stock))), f"{model_type}: logits not finite"

        # Every expert module runs in the prefill and in the decode step, and
        # the prefill spreads its tokens over at least 3 experts.
        called = {}
        for module_id, indices in expert_calls:
            called.setdefault(module_id, []).append(indices)
        for path, m in experts:
            runs = called.get(id(m), [])
            assert len(runs) == 2, f"{model_type}: {path} ran {len(runs)} times"
            assert len(np.unique(runs[0])) >= 3, f"{model_type}: {path} routing"

        # The cached decode step equals the last position of an uncached
        # forward of the whole sequence.
        full = model(mx.array([zoo.PROMPT + [zoo.NEXT_TOKEN]]))
        assert rel_err(decode[0, -1], full[0, -1]) < 1e-5

        # The same seed builds the same model, bit for bit; another seed not.
        twin, _ = zoo.build(model_type, seed=0)
        for (path, a), (_, b) in zip(params, tree_flatten(twin.parameters())):
            assert mx.array_equal(a, b).item(), f"{model_type}: {path} differs"
        assert np.array_equal(logits(zoo.run(twin)), logits(stock))
        other, _ = zoo.build(model_type, seed=1)
        first = projections(experts[0][1])[0][1]
        other_first = projections(zoo.expert_modules(other)[0][1])[0][1]
        assert not mx.array_equal(first.weight, other_first.weight).item()

        errs = {}
        for bits, m in ((4, twin), (3, model)):
            prequantized = sum(hasattr(x, "bits") for _, x in m.named_modules())
            count = zoo.quantize_experts(m, bits)
            assert count == sum(2 if isinstance(e, SwitchMLP) else 3 for _, e in experts)
            for path, e in zoo.expert_modules(m):
                for name, p in projections(e):
                    assert isinstance(p, QuantizedSwitchLinear), f"{path}.{name}"
                    assert (p.bits, p.group_size, p.mode) == (bits, 64, "affine")
            # Nothing but the experts was quantized.
            quantized = sum(hasattr(x, "bits") for _, x in m.named_modules())
            assert quantized == prequantized + count
            quant = logits(zoo.run(m))
            assert np.all(np.isfinite(quant)), f"{model_type}: {bits}-bit logits"
            errs[bits] = rel_err(quant, logits(stock))
            assert MIN_QUANT_ERR < errs[bits] < MAX_QUANT_ERR[bits], (
                f"{model_type}: {bits}-bit experts moved the logits by {errs[bits]:.3g}"
            )
        assert errs[3] > errs[4], f"{model_type}: 3 bits closer than 4: {errs}"


@pytest.mark.parametrize("model_type", sorted(zoo.CPU_IMPOSSIBLE))
def test_cpu_impossible_still_fails(model_type):
    if mx.metal.is_available():
        pytest.skip("Metal is present: mlx_lm.kernels run on the GPU whatever the stream")
    with mx.stream(mx.cpu):
        model, _ = zoo.build(model_type, seed=0)
        assert zoo.expert_modules(model)
        with pytest.raises(RuntimeError, match=re.escape(zoo.CPU_IMPOSSIBLE[model_type])):
            zoo.run(model)
