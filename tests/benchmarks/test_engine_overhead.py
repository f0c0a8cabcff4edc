"""The host-overhead benchmark times its synchronous and its scheduled-ahead decode steps."""
import pytest
import torch

from infer.benchmarks import engine_overhead as eo


@pytest.mark.parametrize("ahead", [False, True])
def test_every_phase_is_timed_each_step(ahead):
    gen = torch.Generator().manual_seed(0)
    sched = eo.build_scheduler(8, 4096, seed=0)
    eo.prefill(sched, gen)
    times = eo.ahead_steps(sched, 3, gen) if ahead else eo.decode_steps(sched, 3, 0, gen)
    phases = eo.AHEAD_PHASES if ahead else eo.HOST_PHASES
    assert all(len(times[phase]) == 3 for phase in phases)
    rows = eo.summarize(times, phases)
    assert [row["phase"] for row in rows][:len(phases)] == list(phases) and "host total" in rows[-1]["phase"]
    assert all(s.num_output_tokens == 5 for s in sched.running)  # prefill, warm-up and 3 timed steps
