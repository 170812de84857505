"""`herd average`: the element-wise mean of checkpoints, across layouts."""

import pytest
import torch

from llamaherd.checkpoint import load, save
from llamaherd.checkpoint.average import average
from llamaherd.cli import main
from llamaherd.errors import HerdError


def test_the_average_is_the_elementwise_mean_across_layouts(make_tiny_model, tmp_path):
    a, b, c = make_tiny_model(seed=0), make_tiny_model(seed=1), make_tiny_model(seed=2)
    save(a, tmp_path / "a", layout="herd")
    save(b, tmp_path / "b", layout="hf")  # layouts may differ
    save(c, tmp_path / "c", layout="meta")
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"),
                 "--out", str(tmp_path / "avg")]) == 0
    avg, _ = load(tmp_path / "avg")
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, (sa[k] + sb[k] + sc[k]) / 3, atol=1e-6, rtol=0)
    weighted = average([tmp_path / "a", tmp_path / "b"], tmp_path / "w", weights=[3, 1])
    for k, v in load(weighted)[0].state_dict().items():
        torch.testing.assert_close(v, (3 * sa[k] + sb[k]) / 4, atol=1e-6, rtol=0)


def test_averaging_other_shapes_or_one_checkpoint_is_a_one_line_error(make_tiny_model, tmp_path, capsys):
    save(make_tiny_model(seed=0), tmp_path / "a")
    save(make_tiny_model(seed=0, n_layers=3), tmp_path / "deep")
    with pytest.raises(HerdError, match="n_layers 2 vs 3"):
        average([tmp_path / "a", tmp_path / "deep"], tmp_path / "x")
    assert main(["average", str(tmp_path / "a"), "--out", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.strip() == "error: averaging needs two checkpoints or more, got 1"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
