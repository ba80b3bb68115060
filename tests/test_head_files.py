"""Head files in the published layouts (the seed's and the official Interlat stage-1 `hidden_mha_state.pt`)
load, and the loaded head computes what the published head computes.

The files are written here from the documented layout (SPEC 3.4), with the published key names, not from
our module's state_dict; `reference_head` is the published head's forward written out from the formulas
over the file's own tensors, in float64.
"""

import json
import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import train_latent_comm as tlc
from test_cli import base_args

H, HEADS = 64, 4


def published_head_file(hidden=H, output_projection=True, gains="tensor", seed=0):
    """A head file as the published code writes it: nested state dicts, the adaptive MLP named `proj`,
    the gains as 0-dim tensors (`gains="tensor"`), or the older floats `scale` / `output_scale` at the top
    level and no adaptive MLP (`gains="float"`). Random values well away from any initialisation."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    def norm():
        return {"weight": rand(hidden, mean=1.0), "bias": rand(hidden)}

    f = {
        "pre_ln": norm(),
        "hidden_mha": {
            "in_proj_weight": rand(3 * hidden, hidden, std=hidden**-0.5),
            "in_proj_bias": rand(3 * hidden),
            "out_proj.weight": rand(hidden, hidden, std=hidden**-0.5),
            "out_proj.bias": rand(hidden),
        },
        "post_ln": norm(),
    }
    if gains == "tensor":
        f["adaptive_proj"] = {
            "scale": torch.tensor(0.7),
            "output_scale": torch.tensor(0.4),
            "proj.0.weight": rand(hidden, hidden, std=hidden**-0.5),
            "proj.0.bias": rand(hidden),
            "proj.2.weight": rand(hidden, mean=1.0),
            "proj.2.bias": rand(hidden),
            "proj.3.weight": rand(hidden, hidden, std=hidden**-0.5),
            "proj.3.bias": rand(hidden),
        }
    else:
        f["scale"], f["output_scale"] = 0.7, 0.4
    if output_projection:
        f["output_projection"] = {
            "0.weight": rand(2 * hidden, hidden, std=hidden**-0.5),
            "0.bias": rand(2 * hidden),
            "2.weight": rand(hidden, mean=1.0),
            "2.bias": rand(hidden),
            "4.weight": rand(hidden, hidden, std=hidden**-0.5),
            "4.bias": rand(hidden),
        }
    return f


def reference_head(f, x, num_heads=HEADS):
    """The published head (eval mode) from its formulas: y = post_ln(h + MHA(h)), h = pre_ln(x);
    r = y * scale; z = (r + proj(r)) * output_scale (z = r * output_scale for the gains-only files);
    then, in the seed's variant, Linear -> GLU -> LayerNorm -> Linear. float64 throughout."""
    f = {k: ({n: t.double() for n, t in v.items()} if isinstance(v, dict) else v) for k, v in f.items()}
    x = x.double()
    batch, length, hidden = x.shape

    def layer_norm(v, p, eps):
        mean = v.mean(-1, keepdim=True)
        var = ((v - mean) ** 2).mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt(var + eps) * p["weight"] + p["bias"]

    def linear(v, p, name):
        return v @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def gelu(v):
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))

    h = layer_norm(x, f["pre_ln"], 1e-6)
    mha = f["hidden_mha"]
    q, k, v = (h @ mha["in_proj_weight"].T + mha["in_proj_bias"]).split(hidden, dim=-1)
    d = hidden // num_heads

    def heads(t):
        return t.reshape(batch, length, num_heads, d).transpose(1, 2)  # [B, heads, K, d]

    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    attended = (weights @ heads(v)).transpose(1, 2).reshape(batch, length, hidden)
    attended = linear(attended, mha, "out_proj")
    y = layer_norm(h + attended, f["post_ln"], 1e-6)
    if "adaptive_proj" in f:
        ap = f["adaptive_proj"]
        r = y * ap["scale"]
        inner = gelu(linear(r, ap, "proj.0"))
        inner = layer_norm(inner, {"weight": ap["proj.2.weight"], "bias": ap["proj.2.bias"]}, 1e-5)
        z = (r + linear(inner, ap, "proj.3")) * ap["output_scale"]
    else:
        z = y * f["scale"] * f["output_scale"]
    if "output_projection" in f:
        op = f["output_projection"]
        a, gate = linear(z, op, "0").chunk(2, dim=-1)
        glu = a * torch.sigmoid(gate)
        z = linear(layer_norm(glu, {"weight": op["2.weight"], "bias": op["2.bias"]}, 1e-5), op, "4")
    return z


def loaded_head(path, requested="auto", dropout=0.1):
    checkpoint = tlc.read_head_checkpoint(str(path))
    variant = tlc.resolve_head_output_projection(requested, checkpoint)
    head = tlc.HiddenStateHead(H, HEADS, dropout, variant)
    tlc.load_head_state(head, checkpoint)
    return head.eval()


# float32 against float64: a few hundred rounding steps of ~6e-8 on values of order 1.
TOLERANCE = dict(atol=2e-5, rtol=1e-4)

LAYOUTS = {
    "seed (output_projection, proj, 0-dim gains)": dict(output_projection=True, gains="tensor"),
    "official hidden_mha_state.pt (no output_projection)": dict(output_projection=False, gains="tensor"),
    "older official (float gains, no adaptive MLP)": dict(output_projection=False, gains="float"),
    "older seed (float gains, output_projection)": dict(output_projection=True, gains="float"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_published_layouts_load_and_compute_the_published_head(tmp_path, layout):
    f = published_head_file(**LAYOUTS[layout])
    path = tmp_path / "hidden_mha_state.pt"
    torch.save(f, path)
    head = loaded_head(path)
    assert head.output_projection_kind == ("glu" if "output_projection" in f else "none")
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = head(x)
    expected = reference_head(f, x)
    torch.testing.assert_close(got.double(), expected, **TOLERANCE)


def test_reference_catches_a_wrong_mapping(tmp_path):
    """A loader that swapped two of the adaptive MLP's parts, or dropped the output projection, would
    compute something else: the reference comparison is not vacuous."""
    f = published_head_file()
    torch.save(f, tmp_path / "head.pt")
    head = loaded_head(tmp_path / "head.pt")
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        head.adaptive_proj.proj[0].bias.copy_(f["adaptive_proj"]["proj.3.bias"])
        wrong = head(x)
    assert (wrong.double() - reference_head(f, x)).abs().max() > 1e-3
    without_glu = {k: v for k, v in f.items() if k != "output_projection"}
    assert (reference_head(without_glu, x) - reference_head(f, x)).abs().max() > 1e-2


def test_our_layouts_load_old_and_new_names(tmp_path):
    """Our safetensors head files (names as published) and ones saved before `mlp` became `proj`."""
    source = tlc.HiddenStateHead(H, HEADS, 0.1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 5, H)
    expected = source.eval()(x)

    tlc.save_head_checkpoint(source, str(tmp_path / "head.safetensors"))
    keys = set(load_file(str(tmp_path / "head.safetensors")))
    assert "adaptive_proj.proj.0.weight" in keys and not any(".mlp." in k for k in keys)
    torch.testing.assert_close(loaded_head(tmp_path / "head.safetensors")(x), expected)

    old_names = {k.replace(".proj.", ".mlp."): v.contiguous() for k, v in source.state_dict().items()}
    save_file(old_names, str(tmp_path / "old.safetensors"))
    torch.testing.assert_close(loaded_head(tmp_path / "old.safetensors")(x), expected)

    none = tlc.HiddenStateHead(H, HEADS, 0.1, "none")
    tlc.save_head_checkpoint(none, str(tmp_path / "none.safetensors"))
    assert tlc.read_head_checkpoint(str(tmp_path / "none.safetensors")).output_projection == "none"


def test_head_file_errors_name_the_problem(tmp_path):
    f = published_head_file(output_projection=False)
    torch.save(f, tmp_path / "official.pt")
    checkpoint = tlc.read_head_checkpoint(str(tmp_path / "official.pt"))
    with pytest.raises(tlc.LatentCommError, match="has no GLU output projection: pass --head_output_projection auto"):
        tlc.resolve_head_output_projection("glu", checkpoint)

    # Missing and extra keys, named in one line, with the published names.
    f["adaptive_proj"]["proj.5.weight"] = f["adaptive_proj"].pop("proj.3.weight")
    torch.save(f, tmp_path / "bad.pt")
    with pytest.raises(tlc.LatentCommError) as err:
        loaded_head(tmp_path / "bad.pt")
    message = str(err.value)
    assert "missing keys ['adaptive_proj.proj.3.weight']" in message
    assert "unexpected keys ['adaptive_proj.proj.5.weight']" in message
    assert "\n" not in message

    # A head of another width, and one saved with another head count.
    torch.save(published_head_file(hidden=32, output_projection=False), tmp_path / "narrow.pt")
    with pytest.raises(tlc.LatentCommError, match="another width"):
        loaded_head(tmp_path / "narrow.pt")
    tlc.save_head_checkpoint(tlc.HiddenStateHead(H, 8, 0.1), str(tmp_path / "eight.safetensors"))
    with pytest.raises(tlc.LatentCommError, match="--head_num_heads 8"):
        loaded_head(tmp_path / "eight.safetensors")


def test_attention_dropout_is_head_dropout():
    assert tlc.HiddenStateHead(H, HEADS, 0.3).hidden_mha.dropout == 0.3
    x = torch.randn(2, 6, H)
    # Only the attention drops out in the "none" variant: two training passes differ, eval passes do not.
    none = tlc.HiddenStateHead(H, HEADS, 0.3, "none").train()
    assert not torch.equal(none(x), none(x))
    none.eval()
    assert torch.equal(none(x), none(x))


@pytest.fixture()
def teacher_with_official_head(assets, tmp_path):
    """A copy of the tiny teacher whose directory holds an official stage-1 head, as the official
    pipeline leaves it."""
    teacher = tmp_path / "teacher"
    shutil.copytree(assets["teacher"], teacher)
    f = published_head_file(output_projection=False)
    torch.save(f, teacher / tlc.TEACHER_DIR_HEAD_NAME)
    return teacher, f


def one_step(assets, out, *extra):
    args = ("--max_steps", "1", "--eval_ratio", "0", "--save_strategy", "no", *extra)
    assert tlc.main(base_args(assets, out, *args)) == 0


def test_teacher_directory_head_is_used_recorded_and_reloaded(assets, tmp_path, caplog, teacher_with_official_head):
    teacher, f = teacher_with_official_head
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="train_latent_comm")
    one_step(assets, out, "--teacher_model_name_or_path", str(teacher), "--freeze_head")
    assert f"Using the head in the teacher's directory, {teacher / tlc.TEACHER_DIR_HEAD_NAME}" in caplog.text
    config = json.loads((out / tlc.LATENT_CONFIG_NAME).read_text())
    assert config["head_output_projection"] == "none"
    saved = load_file(str(out / tlc.LATENT_MODULES_NAME))
    assert not any(k.startswith("head.output_projection") for k in saved)
    torch.testing.assert_close(saved["head.adaptive_proj.proj.3.weight"], f["adaptive_proj"]["proj.3.weight"])

    # The reloaded run rebuilds the head without an output projection, and it is still the file's head.
    model, _ = tlc.load_latent_model(str(out))
    x = torch.randn(2, 4, H)
    with torch.no_grad():
        torch.testing.assert_close(model.head(x).double(), reference_head(f, x), **TOLERANCE)

    # --ignore_teacher_dir_head: a random head of the default (GLU) variant.
    caplog.clear()
    ignored = tmp_path / "ignored"
    one_step(assets, ignored, "--teacher_model_name_or_path", str(teacher), "--ignore_teacher_dir_head")
    assert json.loads((ignored / tlc.LATENT_CONFIG_NAME).read_text())["head_output_projection"] == "glu"
    assert "Not using" in caplog.text and "Using the head" not in caplog.text


def test_old_runs_load_glu_heads_saved_as_mlp(assets, tmp_path):
    """A run saved before the variant and the published names existed: latent_config.json without
    `head_output_projection`, latent_modules.safetensors with `head.adaptive_proj.mlp.*`."""
    out = tmp_path / "run"
    one_step(assets, out)
    model, _ = tlc.load_latent_model(str(out))
    x = torch.randn(2, 4, H)
    with torch.no_grad():
        expected = model.head(x)
    modules = load_file(str(out / tlc.LATENT_MODULES_NAME))
    save_file({k.replace(".adaptive_proj.proj.", ".adaptive_proj.mlp."): v for k, v in modules.items()},
              str(out / tlc.LATENT_MODULES_NAME))  # fmt: skip
    config = json.loads((out / tlc.LATENT_CONFIG_NAME).read_text())
    del config["head_output_projection"]
    (out / tlc.LATENT_CONFIG_NAME).write_text(json.dumps(config))
    model, _ = tlc.load_latent_model(str(out))
    assert model.head.output_projection_kind == "glu"
    with torch.no_grad():
        torch.testing.assert_close(model.head(x), expected)
