"""The Shapes world: factor grid, renderer determinism and label truth, prompts and tokenizer, dataset, oracle."""

import colorsys

import numpy as np
import pytest
import torch

from layerscope.world import (
    FACTORS,
    N_COMBINATIONS,
    SIZES,
    VALUES,
    ShapesDataset,
    encode,
    factors_from_prompt,
    from_index,
    is_held_out,
    prompt_for,
    prompts_for,
    render,
    sample_factors,
    to_index,
    tokenizer,
)
from layerscope.world.render import BASE_Y, HEIGHT


def test_factor_grid_matches_shapes3d():
    assert N_COMBINATIONS == 480_000
    assert [SIZES[f] for f in FACTORS] == [10, 10, 10, 8, 4, 15]
    assert np.allclose(VALUES["orientation"][[0, -1]], [-30, 30]) and np.allclose(
        VALUES["scale"][[0, -1]], [0.75, 1.25]
    )
    idx = np.array([0, 1, 14, 15, 479_999, 123_457])
    assert (to_index(from_index(idx)) == idx).all()
    assert from_index(1).tolist() == [[0, 0, 0, 0, 0, 1]]
    held = is_held_out(np.arange(N_COMBINATIONS))
    assert 0.09 < held.mean() < 0.11
    test = sample_factors(500, 1, split="test")
    assert is_held_out(to_index(test)).all() and not is_held_out(to_index(sample_factors(500, 1, "train"))).any()
    with pytest.raises(ValueError, match="shape index out of range"):
        render([[0, 0, 0, 0, 4, 0]])


def test_render_deterministic_and_row_independent():
    f = sample_factors(64, 3)
    a = render(f, 32)
    assert a.shape == (64, 3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, render(f, 32))
    assert torch.equal(a[5:6], render(f[5:6], 32))  # an image does not depend on its batch
    assert render(f[:4], 64).shape == (4, 3, 64, 64) and render(f[:2], (24, 40)).shape == (2, 3, 24, 40)
    u8 = render(f[:4], 32, uint8=True)
    assert u8.dtype == torch.uint8 and (u8.float() / 255 - a[:4]).abs().max() <= 0.5 / 255 + 1e-6


def _hue_index(rgb: torch.Tensor) -> int:
    h = colorsys.rgb_to_hsv(*rgb.tolist())[0]
    d = np.abs((VALUES["floor_hue"] - h + 0.5) % 1.0 - 0.5)  # circular distance to the grid
    return int(d.argmin())


def test_labels_are_true_in_the_pixels():
    f = sample_factors(200, 5)
    img = render(f, 64)
    for k in range(len(f)):
        fl, wa, ob, sc, sh, ori = f[k]
        assert _hue_index(img[k, :, 63, 2]) == fl  # bottom-left: floor
        assert _hue_index(img[k, :, 1, 1]) == wa  # top-left: wall
        centre_y = int((BASE_Y - HEIGHT * VALUES["scale"][sc] / 2) * 64)
        assert _hue_index(img[k, :, centre_y, 32]) == ob  # the object's centre
    # scale: the object's height grows with the scale factor; orientation: the wall corner moves right to left
    base = np.array([[0, 0, 5, s, 0, 7] for s in range(8)])
    obj = (render(base, 64) - render(base * [1, 1, 1, 1, 1, 1] + [0, 0, -5, 0, 0, 0], 64)).abs().sum(1) > 0.05
    heights = obj.any(dim=2).sum(dim=1)
    assert (heights[1:] > heights[:-1]).all()
    turned = [o for o in range(15) if o != 7]  # at 0 degrees both wall faces are lit alike
    rows = render(np.array([[2, 6, 0, 0, 2, o] for o in turned]), 64)[:, :, 4, :]  # a row of wall pixels
    bright = rows.max(dim=1).values
    corner = (bright[:, 1:] - bright[:, :-1]).abs().argmax(dim=1)
    assert (corner[1:] <= corner[:-1]).all() and corner[0] > corner[-1] + 20
    # shapes differ in silhouette: width of the object at its middle row
    shapes = render(np.array([[0, 0, 5, 7, s, 7] for s in range(4)]), 64)
    empty = render(np.array([[0, 0, 0, 7, s, 7] for s in range(4)]), 64)  # same shapes in another colour
    widths = ((shapes - empty).abs().sum(1) > 0.05)[:, int((BASE_Y - HEIGHT * 1.25 / 2) * 64)].sum(1).tolist()
    assert widths[0] > widths[1] > widths[3] and widths[2] > widths[1]  # cube > cylinder > capsule; sphere wide


def test_prompts_and_tokenizer():
    f = sample_factors(300, 7)
    ps = prompts_for(f)
    assert ps[0] == prompt_for(f[0])
    assert (np.stack([factors_from_prompt(p) for p in ps]) == f).all()
    assert (
        prompt_for([0, 1, 2, 0, 2, 7])
        == "a tiny yellow sphere on a red floor in front of an orange wall, seen from the front"
    )
    with pytest.raises(ValueError, match="not a Shapes-world prompt"):
        factors_from_prompt("a photo of a dog")
    tok = tokenizer()
    ids = encode(ps[:3] + [""])
    assert ids.shape == (4, 24)
    assert (ids[:, 0] == tok.bos_token_id).all() and ids[3, 1] == tok.eos_token_id and ids[3, 2] == tok.pad_token_id
    words = tok.convert_ids_to_tokens(ids[0])
    n = len(ps[0].replace(",", " ,").split())
    assert words[1 : n + 1] == ps[0].replace(",", " ,").split() and words[n + 1] == "<eos>"
    assert tok.unk_token_id not in ids
    assert tok("a dog")["input_ids"][2] == tok.unk_token_id


def test_dataset():
    ds = ShapesDataset("test", size=32, prompts=True)
    assert 47_000 < len(ds) < 49_000
    img, lab, prompt = ds[10]
    assert img.shape == (3, 32, 32) and torch.equal(img, render(lab[None].numpy(), 32)[0])
    assert factors_from_prompt(prompt).tolist() == lab.tolist()
    loader = torch.utils.data.DataLoader(ShapesDataset(np.arange(100)), batch_size=32)
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 32, 32) and y.tolist()[1] == [0, 0, 0, 0, 0, 1]


def test_oracle_reads_fresh_heldout_renders():
    from layerscope.world.oracle import ece, read

    f = sample_factors(600, 2024, split="test")
    r = read(render(f, 32))
    acc = (r.pred == f).mean(axis=0)
    assert (acc >= 0.99).all(), dict(zip(FACTORS, acc))
    assert r.features.shape == (600, 256)
    # also at 64x64 (resized to the oracle's input)
    assert ((read(render(f[:200], 64)).pred == f[:200]).mean(axis=0) >= 0.97).all()
    for i, name in enumerate(FACTORS):
        assert ece(r.probs[name], f[:, i]) < 0.02


def test_world_render_cli_and_grid(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from layerscope.cli import app
    from layerscope.image_files import to_grid

    g = to_grid(render(sample_factors(5, 0), 16), nrow=4)
    assert g.shape == (3, 2 * 17 + 1, 4 * 17 + 1)
    r = CliRunner().invoke(
        app, ["world", "render", str(tmp_path / "g.png"), "--n", "4", "--size", "16", "--scale", "1"]
    )
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "g.png").size == (4 * 17 + 1, 17 + 1)
    assert "seen from" in r.output
    assert CliRunner().invoke(app, ["world", "render", str(tmp_path / "x.png"), "--split", "nope"]).exit_code == 2
