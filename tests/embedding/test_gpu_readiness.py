"""Ready for the first GPU: what a CPU can check of the kernel's and encoders' device side.

Device errors are stood in for by wrapping encoders that raise torch's own errors; the
CUDA comparisons themselves are marked ``requires_cuda`` (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from raptorz.embedding.encoders import Encoder, create_encoder, device_precision
from raptorz.embedding.kernel import embed_block
from raptorz.embedding.projection import create_projector
from raptorz.embedding.settings import KernelSettings
from raptorz.errors import RaptorzError

TESTS = Path(__file__).resolve().parents[1]


class Wrapped:
    """A real encoder seen through a wrapper that a test makes fail like a device."""

    def __init__(self, encoder: Encoder) -> None:
        self.__dict__["inner"] = encoder

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def _block(count: int = 2) -> np.ndarray:
    return np.random.default_rng(5).random((count, 12, 10, 9)).astype(np.float32)


def _requires_cuda(node: ast.FunctionDef) -> bool:
    return any("requires_cuda" in ast.unparse(decorator) for decorator in node.decorator_list)


def test_every_test_encoder_runs_on_the_cpu_unless_requires_cuda() -> None:
    """On a GPU machine an encoder without a device runs on CUDA in bf16: a test compared
    against CPU numbers would then compare bf16 with fp32."""
    missing = []
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        cuda_calls = {id(call) for node in ast.walk(tree)
                      if isinstance(node, ast.FunctionDef) and _requires_cuda(node)
                      for call in ast.walk(node)}
        missing += [f"{path.relative_to(TESTS)}:{call.lineno}" for call in ast.walk(tree)
                    if isinstance(call, ast.Call) and id(call) not in cuda_calls
                    and ast.unparse(call.func).endswith("create_encoder")
                    and not any(k.arg in ("device", None) for k in call.keywords)]
    assert not missing, f"create_encoder without device=: {missing}"


def test_the_default_batch_is_sized_by_the_input(tiny_vit_weights: tuple[str, Path]) -> None:
    """Activations grow with the square of the input side: 448 px gets a quarter batch."""
    name, path = tiny_vit_weights
    large = create_encoder(name, weights=path, device="cpu", img_size=448)
    projectors = [create_projector(0, large.embed_dim, 4)]
    assert embed_block(_block(1), large, projectors).batch_size == 4  # 16 at 224 px
    assert embed_block(_block(1), large, projectors,
                       KernelSettings(batch_size=7)).batch_size == 7  # as asked


def test_a_batch_whose_preparation_ran_out_of_memory_is_prepared_in_parts(
        encoder: Encoder) -> None:
    class PreparationFails(Wrapped):
        failures = 1

        @property
        def mean(self) -> tuple[float, ...]:  # read as each batch is prepared
            if PreparationFails.failures:
                PreparationFails.failures -= 1
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in, preparation)")
            return self.inner.mean  # type: ignore[no-any-return]

    projectors = [create_projector(0, encoder.embed_dim, 4)]
    settings = KernelSettings(batch_size=32)
    reference = embed_block(_block(), encoder, projectors, settings)
    result = embed_block(_block(), PreparationFails(encoder), projectors, settings)  # type: ignore[arg-type]
    assert PreparationFails.failures == 0
    np.testing.assert_allclose(result.projections[projectors[0].name],
                               reference.projections[projectors[0].name], rtol=1e-5, atol=1e-6)


def test_tokens_that_overflow_are_an_error_not_a_result(encoder: Encoder) -> None:
    class Overflows(Wrapped):
        def encode(self, images: torch.Tensor) -> torch.Tensor:
            tokens = self.inner.encode(images).clone()
            tokens[0, 0, 0] = torch.inf  # an fp16 activation past 65504
            return tokens  # type: ignore[no-any-return]

    with pytest.raises(RaptorzError, match="non-finite tokens at precision fp32"):
        embed_block(_block(), Overflows(encoder), [create_projector(0, encoder.embed_dim, 4)])  # type: ignore[arg-type]


def test_bf16_is_asked_of_the_requested_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that holds a V100 as cuda:1 and an A100 as the current device gets fp16."""
    capability = {0: (8, 0), 1: (7, 0)}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: capability[torch.device(device).index or 0])
    assert device_precision(torch.device("cuda", 0)) == "bf16"
    assert device_precision(torch.device("cuda", 1)) == "fp16"


def test_the_checksum_is_taken_before_the_model_moves(tiny_vit_weights: tuple[str, Path]) -> None:
    """Hashing after the move would copy the weights back from the device (1.2 GB for a
    ViT-L per worker start); the meta device, which holds no data, shows which came first."""
    name, path = tiny_vit_weights
    on_cpu = create_encoder(name, weights=path, device="cpu", pack=False)
    moved = create_encoder(name, weights=path, device="meta", pack=False)
    assert moved.checksum == on_cpu.checksum
    assert next(moved.model.parameters()).device.type == "meta"
    assert on_cpu.provenance()["tf32"] is False  # recorded; only CUDA may use TF32


@pytest.mark.requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-4), ("bf16", 0.1),
                                                      ("fp16", 0.02)])
def test_cuda_matches_cpu_fp32_per_precision(tiny_vit_weights: tuple[str, Path],
                                             precision: str, tolerance: float) -> None:
    """CUDA at each precision against CPU fp32, relative to the projections' scale; fp32
    runs without TF32 (as a worker sets it), so it agrees to float32 rounding."""
    from raptorz.embedding.worker import _exact_fp32

    name, path = tiny_vit_weights
    cpu = create_encoder(name, weights=path, device="cpu")
    cuda = create_encoder(name, weights=path, device="cuda", precision=precision)  # type: ignore[arg-type]
    _exact_fp32(cuda)
    projectors = [create_projector(0, cpu.embed_dim, 8)]
    want = embed_block(_block(), cpu, projectors).projections[projectors[0].name]
    got = embed_block(_block(), cuda, projectors).projections[projectors[0].name]
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < tolerance
    assert cuda.provenance()["tf32"] is (precision != "fp32")
