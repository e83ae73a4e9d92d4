"""GradientAllreducer: bucket layout, wire formats, CUDA-awareness decisions, and (under a real
mpiexec) gradients equal to one process on the union of unequal batches."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from torch import nn

from disdl_mpi.comm import compression, cuda_aware
from disdl_mpi.comm.allreducer import GradientAllreducer
from disdl_mpi.units import union_seconds
from tests.mpi_helpers import run_mpi
from tests.output_checks import roundtrip_relative_error


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def _one_rank() -> MPI.Comm:
    return MPI.COMM_SELF


@pytest.mark.parametrize("bucket_mb", [0, 0.01, 0.1, 0.2, 100])
def test_buckets_cover_every_parameter_once_in_reverse_order(bucket_mb):
    model = _model()
    red = GradientAllreducer(model, _one_rank(), bucket_mb=bucket_mb)
    names = [n for b in red.bucket_names() for n in b]
    registered = [n for n, _ in model.named_parameters()]
    assert names == registered[::-1]
    cap = bucket_mb * 2**20
    for b in red.buckets:
        nbytes = b.numel * b.grad_buf.element_size()
        # size-bounded: only a bucket holding a single over-sized tensor may exceed the cap
        assert nbytes <= cap or len(b.params) == 1
        assert b.grad_buf.is_contiguous() and b.grad_buf.dim() == 1
    if bucket_mb == 0:
        assert len(red.buckets) == len(registered)
    if bucket_mb == 100:
        assert len(red.buckets) == 1
    red.close()


def test_grads_are_views_into_the_bucket_and_skip_and_frozen_are_excluded():
    model = _model()
    model[0].bias.requires_grad_(False)
    red = GradientAllreducer(model, _one_rank(), bucket_mb=0.05, skip=lambda n, p: n == "2.weight")
    names = [n for b in red.bucket_names() for n in b]
    assert "0.bias" not in names and "2.weight" not in names
    assert len(names) == len(set(names)) == 4
    for b in red.buckets:
        lo = b.grad_buf.data_ptr()
        hi = lo + b.numel * b.grad_buf.element_size()
        for p in b.params:
            assert lo <= p.grad.data_ptr() < hi
    red.close()


def test_single_rank_weighting_unused_and_empty_step():
    model = _model()
    red = GradientAllreducer(model, _one_rank(), bucket_mb=0.05)
    x = torch.randn(8, 64)
    model.zero_grad(set_to_none=True)  # begin_step must re-attach the views
    red.begin_step(0.25)
    model[:4](x).sum().backward()  # the last layer is unused this step
    stats = red.finish_step()
    assert set(stats) >= {"total_s", "exposed_s"}
    assert stats["total_s"] >= 0 and stats["exposed_s"] >= 0
    assert float(model[4].weight.grad.abs().max()) == 0.0
    ref = _model()
    ref[:4](x).sum().backward()
    assert torch.allclose(model[0].weight.grad, 0.25 * ref[0].weight.grad, atol=1e-6)
    # An empty step (no backward at all) still completes and writes zeros.
    red.begin_step(0.0)
    red.finish_step()
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())
    ev = red.events
    assert [e.bucket for e in ev] == list(range(len(red.buckets)))
    assert all(e.t_end >= e.t_start >= 0 and e.bytes > 0 for e in ev)
    red.close()


def test_step_protocol_errors_are_clear():
    red = GradientAllreducer(_model(), _one_rank())
    with pytest.raises(RuntimeError, match="without begin_step"):
        red.finish_step()
    with pytest.raises(ValueError, match="weight"):
        red.begin_step(float("nan"))
    red.begin_step(1.0)
    with pytest.raises(RuntimeError, match="twice"):
        red.begin_step(1.0)
    red.finish_step()
    with pytest.raises(ValueError, match="bucket_mb"):
        GradientAllreducer(_model(), _one_rank(), bucket_mb=-1)
    with pytest.raises(ValueError, match="compress"):
        GradientAllreducer(_model(), _one_rank(), compress="int8")


def test_wire_dtypes_and_fp16_error_bound():
    assert compression.wire_dtype(torch.float32, "none") == torch.float32
    assert compression.wire_dtype(torch.float32, "fp16") == torch.float16
    assert compression.wire_dtype(torch.bfloat16, "none") == torch.float32
    assert compression.wire_dtype(torch.bfloat16, "fp16") == torch.float16
    g = torch.randn(10000) * 1e-2
    err = roundtrip_relative_error(g, "fp16")
    assert 0 < err <= 1e-3
    assert roundtrip_relative_error(g, "none") == 0.0


def test_fp16_bucket_halves_the_wire_bytes_and_bf16_travels_as_fp32():
    model = _model()
    red = GradientAllreducer(model, _one_rank(), compress="fp16")
    assert all(b.wire.dtype == torch.float16 for b in red.buckets)
    red.begin_step(1.0)
    model(torch.randn(4, 64)).sum().backward()
    stats = red.finish_step()
    n = sum(p.numel() for p in model.parameters())
    assert stats["bytes"] == 2 * n
    red.close()
    bf = _model().to(torch.bfloat16)
    red = GradientAllreducer(bf, _one_rank())
    assert all(b.wire.dtype == torch.float32 for b in red.buckets)
    red.begin_step(0.5)
    bf(torch.randn(4, 64, dtype=torch.bfloat16)).sum().backward()
    red.finish_step()
    assert all(p.grad.dtype == torch.bfloat16 for p in bf.parameters())
    red.close()


def testunion_seconds():
    assert union_seconds([]) == 0
    assert union_seconds([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)
    assert union_seconds([(0, 4), (1, 2)]) == pytest.approx(4.0)


def test_cuda_aware_detection_and_overrides(monkeypatch):
    monkeypatch.delenv(cuda_aware.ENV_OVERRIDE, raising=False)
    auto = cuda_aware.detect("auto")
    assert isinstance(auto.aware, bool) and auto.reason
    assert isinstance(cuda_aware.detect().aware, bool)
    assert cuda_aware.detect("yes").aware is True
    assert cuda_aware.detect("no").aware is False
    monkeypatch.setenv(cuda_aware.ENV_OVERRIDE, "1")
    assert cuda_aware.detect("auto").aware is True
    assert cuda_aware.detect("no").aware is False  # the explicit choice wins
    monkeypatch.setenv(cuda_aware.ENV_OVERRIDE, "off")
    assert cuda_aware.detect("auto").aware is False
    monkeypatch.setenv(cuda_aware.ENV_OVERRIDE, "maybe")
    with pytest.raises(ValueError, match="DISDL_CUDA_AWARE"):
        cuda_aware.detect("auto")
    with pytest.raises(ValueError):
        cuda_aware.detect("sometimes")
    assert cuda_aware.env_signal({"MPICH_GPU_SUPPORT_ENABLED": "1"}) == "MPICH_GPU_SUPPORT_ENABLED"
    assert cuda_aware.env_signal({"OMPI_MCA_opal_cuda_support": "true"})
    assert cuda_aware.env_signal({"UCX_MEMTYPE_CACHE": "n"}) is None
    assert cuda_aware.env_signal({}) is None


def test_query_of_the_loaded_mpi_library():
    # The MPICH wheel exports MPIX_Query_cuda_support (and is built without CUDA).
    q = cuda_aware.query_mpi_library()
    assert q is None or isinstance(q, bool)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("choice", ["yes", "no"])
def test_cuda_paths_single_rank(choice):
    if choice == "yes" and not cuda_aware.detect("auto").aware:
        pytest.skip("the MPI library is not CUDA-aware")
    model = _model().cuda()
    red = GradientAllreducer(model, _one_rank(), cuda_aware=choice)
    assert red.path == ("cuda-aware" if choice == "yes" else "host-staged")
    x = torch.randn(8, 64, device="cuda")
    red.begin_step(0.5)
    model(x).sum().backward()
    red.finish_step()
    ref = _model().cuda()
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, 0.5 * q.grad, atol=1e-5)
    red.close()


def test_cpu_path_name():
    red = GradientAllreducer(_model(), _one_rank())
    assert red.path == "cpu-zero-copy"
    red.close()


@pytest.mark.mpi
def test_gradients_match_single_process_two_ranks():
    proc = run_mpi(2, ["-m", "tests.mpi_programs.allreducer_check"], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for s in ("overlap", "no-overlap", "per-tensor", "one-bucket", "fp16", "skip"):
        assert f"OK {s} ranks=2" in proc.stdout


@pytest.mark.mpi
def test_gradients_match_single_process_three_ranks_with_an_empty_rank():
    proc = run_mpi(
        3, ["-m", "tests.mpi_programs.allreducer_check", "overlap", "no-overlap", "per-tensor"], timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for s in ("overlap", "no-overlap", "per-tensor"):
        assert f"OK {s} ranks=3" in proc.stdout


@pytest.mark.mpi
def test_a_failing_rank_aborts_instead_of_hanging():
    # A mismatched layout (different models per rank) must raise, not deadlock.
    code = (
        "import torch; from torch import nn; from mpi4py import MPI;"
        "from disdl_mpi.comm.world import install_abort_handler;"
        "from disdl_mpi.comm.allreducer import GradientAllreducer;"
        "c = MPI.COMM_WORLD; install_abort_handler(c);"
        "GradientAllreducer(nn.Linear(4, 2 + c.rank), c)"
    )
    proc = run_mpi(2, ["-c", code], timeout=120)
    assert proc.returncode != 0
    assert "models or skip() differ between ranks" in proc.stderr
