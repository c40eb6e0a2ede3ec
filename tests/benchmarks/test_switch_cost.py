"""benchmarks.switch_cost end to end on the toy UNet: every phase runs, the switches select bit-identical directions,
and the table renders."""

import pytest

from benchmarks import run, switch_cost


@pytest.mark.slow
def test_switch_cost_runs_every_phase_on_the_tiny_unet_and_the_full_report_shows_it(tmp_path, monkeypatch):
    result = switch_cost.main(["--unet", "tiny", "--latent", "8", "--baseline_steps", "1", "--background_steps", "1",
                               "--overlap_pairs", "1", "--split_layers", "0",
                               "--out", str(tmp_path / "switch_cost.json")])
    u = result["unet"]
    assert u["adapted_layers"] == 136
    assert u["at_switch"]["identical_to_background"]
    assert u["upfront_cache_cold"]["identical_to_at_switch"] and u["upfront_cache_warm"]["identical_to_at_switch"]
    cold, warm = u["upfront_cache_cold"]["precompute"], u["upfront_cache_warm"]["precompute"]
    assert cold["cache_hits"] == 0
    assert warm["cache_hits"] > 0
    assert warm["cache_rebuilt"] == 0
    assert u["files_bytes"]["dash_diffusers"] > u["files_bytes"]["lora_diffusers"] > 0
    assert len(u["overlap"]["paired_ratio"]) == 1
    assert "| up front, cache of an earlier run |" in result["markdown"]
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    assert run.standalone_sections()[-1] == result["markdown"]
