"""A cached result is used only over the very state its run wrote."""

from __future__ import annotations

from model.memory.checkpoint import save_state
from tasks.caching import OUTPUT_STATE, outputs_match, stamp_output
from tests.model.helpers import make_nonzero, tiny_with_cms


def test_a_result_matches_only_the_state_its_run_wrote(tmp_path):
    _, cms = tiny_with_cms()
    out = tmp_path / "state"
    save_state(cms, out, metadata={"run": "A"})
    result = stamp_output({"period": 0}, out)
    assert result["period"] == 0 and len(result[OUTPUT_STATE]) == 64
    assert outputs_match(result, out)
    make_nonzero(cms, 0)  # another run (other params) wrote the same directory
    save_state(cms, out, metadata={"run": "B"})
    assert not outputs_match(result, out)
    assert outputs_match(stamp_output({"period": 0}, out), out)
    assert not outputs_match({"period": 0}, out)  # a result from before results recorded their state
    assert not outputs_match(result, tmp_path / "missing") and not outputs_match(None, out)
    (out / "experts.safetensors").write_bytes(b"damaged")  # intact is still required
    assert not outputs_match(stamp_output({"period": 0}, out), out)
