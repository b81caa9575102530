"""Models: training on phantom data makes the loss fall, ONNX export matches PyTorch, the shipped
artifacts honour the specs, and evaluation figures come from the models (a random model scores far lower).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cspine.domain import Modality, SeriesRole
from cspine.inference.specs import LESION_EMBED, MODELS, PROTO_CLASSIFY, SEG_GEOMETRY, SEG_LABELS, DType, seg_spec
from cspine.modeling.data import (
    SEEN_SUBTYPES,
    UNSEEN_SUBTYPES,
    LesionBank,
    SegCase,
    lesion_bank,
    lesion_boxes,
    model_labels,
)
from cspine.modeling.evaluate import dice, eval_cohort, fewshot_metrics, onnx_embed, onnx_seg, seg_metrics, torch_seg
from cspine.modeling.export import (
    PARITY,
    EmbedExport,
    check_parity,
    export_embed,
    export_proto,
    export_seg,
    load_seg_onnx,
    model_path,
    one_hot_batch,
    random_inputs,
)
from cspine.modeling.losses import IGNORE, NOT_TUMOR, seg_loss
from cspine.modeling.networks import LesionEncoder, ProtoClassifier, SegExport, UNet2D
from cspine.modeling.recipes import (
    EVAL_SEED,
    FEWSHOT_BANK_SEED,
    FIRST_ROUND,
    PRESETS,
    proto_classifier,
    train_models,
)
from cspine.modeling.train import (
    EmbedConfig,
    Run,
    SegConfig,
    _focus_voxels,
    _stack,
    box_prior_labels,
    load_seg,
    members_by_modality,
    seg_loop,
    train_embed,
)
from cspine.phantom.anatomy import Label

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
SMOKE = PRESETS["smoke"]
ONNX_DTYPES = {DType.FP32: onnx.TensorProto.FLOAT, DType.UINT8: onnx.TensorProto.UINT8}


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cspine-cache")


def _calibrated(module: torch.nn.Module, *inputs: torch.Tensor) -> torch.nn.Module:
    """A random model whose batch-norm statistics are not the defaults (so eval mode is exercised)."""
    module.train()
    with torch.no_grad():
        module(*inputs)
    return module.eval()


def test_model_labels_map_phantom_structures_into_each_table():
    structure = np.array([[Label.VERTEBRAL_BODY, Label.CSF, Label.CORD, Label.OPLL, Label.TUMOR, Label.SOFT_TISSUE]])
    levels = np.array([[4, 0, 0, 0, 4, 0]])
    ct = [SEG_LABELS[Modality.CT][v] for v in model_labels(Modality.CT, structure, levels)[0]]
    assert ct == ["vertebral_body", "canal", "canal", "opll", "tumor", "background"]
    mr = [SEG_LABELS[Modality.MR][v] for v in model_labels(Modality.MR, structure, levels)[0]]
    assert mr == ["vertebral_body", "csf", "cord", "background", "tumor", "background"]
    xr = [SEG_LABELS[Modality.XR][v] for v in model_labels(Modality.XR, structure, levels)[0]]
    assert xr[0] == "c4_body" and xr[4] == "tumor"


def test_lesion_boxes_give_one_tight_box_per_lesion():
    mask = np.zeros((6, 20, 20), dtype=bool)
    mask[1:3, 2:5, 3:9] = True
    mask[4:6, 10:15, 12:14] = True
    boxes = sorted(lesion_boxes(mask), key=lambda b: b[0].start)
    assert [(b[0].start, b[0].stop, b[1].start, b[1].stop, b[2].start, b[2].stop) for b in boxes] == [
        (1, 3, 2, 5, 3, 9),
        (4, 6, 10, 15, 12, 14),
    ]


def _ellipsoid_case() -> tuple[SegCase, tuple[slice, ...], np.ndarray]:
    """A CT case whose one lesion is an ellipsoid of radii 3, 6 and 8 voxels in a 9 × 15 × 19 box."""
    labels = np.zeros((12, 32, 32), dtype=np.uint8)
    k, i, j = np.meshgrid(np.arange(12), np.arange(32), np.arange(32), indexing="ij")
    lesion = ((k - 5) / 4.4) ** 2 + ((i - 15) / 7.4) ** 2 + ((j - 16) / 9.4) ** 2 <= 1
    labels[:, 20:, :] = SEG_LABELS[Modality.CT].index("vertebral_body")
    labels[lesion] = SEG_LABELS[Modality.CT].index("tumor")
    case = SegCase({SeriesRole.CT: np.zeros(labels.shape, np.float16)}, labels)
    (box,) = case.boxes()
    return case, box, lesion


def test_a_box_prior_labels_the_lesion_core_or_the_whole_inscribed_ellipsoid():
    case, box, lesion = _ellipsoid_case()
    tumor = SEG_LABELS[Modality.CT].index("tumor")
    core = box_prior_labels(case, [box], tumor, "core").pseudo
    whole = box_prior_labels(case, [box], tumor, "ellipsoid").pseudo
    assert core is not None and whole is not None
    outside = np.ones(lesion.shape, bool)
    outside[box] = False
    for labels in (core, whole):  # outside the box the labels are the truth's
        assert np.array_equal(labels[outside], case.labels[outside])
    # core: 0.8 of the radii is tumor (about half the lesion), the rest of the box unknown
    assert set(np.unique(core[box])) == {tumor, IGNORE}
    assert (core == tumor).sum() < 0.6 * lesion.sum() and not (core == tumor)[~lesion].any()
    # ellipsoid: the whole inscribed ellipsoid is tumor, the box's corners are known not to be
    assert set(np.unique(whole[box])) == {tumor, NOT_TUMOR}
    assert dice(whole == tumor, lesion) > 0.9


def test_not_tumor_targets_penalise_the_tumor_probability_whatever_the_other_class():
    tumor = SEG_LABELS[Modality.CT].index("tumor")
    classes = len(SEG_LABELS[Modality.CT])
    target = torch.full((1, 4, 4), NOT_TUMOR, dtype=torch.long)
    image = torch.zeros(1, 4, 4)

    def loss_with_logit_on(label: int) -> float:
        logits = torch.zeros(1, classes, 4, 4)
        logits[:, label] = 8.0
        return float(seg_loss(logits, target, image, [], tumor))

    on_body, on_disc, on_tumor = (
        loss_with_logit_on(SEG_LABELS[Modality.CT].index(n)) for n in ("vertebral_body", "disc", "tumor")
    )
    assert on_body == pytest.approx(on_disc) and on_body < 0.01
    assert on_tumor > 5.0


def test_ct_stacks_focused_on_opll_hold_it_and_the_others_mostly_miss_it():
    """OPLL is in 15 of the 120 training studies, a few hundred voxels each: --focus-stacks N adds N stacks per batch
    centred on one of its voxels (SegConfig.focus)."""
    opll = SEG_LABELS[Modality.CT].index("opll")
    labels = np.zeros((40, 160, 160), dtype=np.uint8)
    labels[:, 40:120, 40:120] = SEG_LABELS[Modality.CT].index("vertebral_body")
    labels[30:33, 130:133, 20:23] = opll  # 27 voxels at the edge of the image, away from the spine
    case = SegCase({SeriesRole.CT: np.zeros(labels.shape, np.float16)}, labels)
    config = SegConfig.for_modality(Modality.CT, focus_stacks=1)
    assert (config.focus, config.name) == ("opll", "seg_ct_focus1")
    assert SegConfig.for_modality(Modality.CT).focus_stacks == 0  # the shipped recipe draws no focused stack
    with pytest.raises(ValueError, match="no structure to focus"):
        SegConfig.for_modality(Modality.MR, focus_stacks=1)
    with pytest.raises(ValueError, match="no 'opll' label"):
        SegConfig.for_modality(Modality.MR, focus="opll", focus_stacks=1)
    empty = SegCase({SeriesRole.CT: np.zeros(labels.shape, np.float16)}, np.zeros_like(labels))
    voxels = _focus_voxels([empty, case], config)
    assert list(voxels) == [1] and len(voxels[1]) == 27
    assert _focus_voxels([case], SegConfig.for_modality(Modality.CT)) == {}
    focused = random = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        point = voxels[1][int(rng.integers(27))]
        _, targets, _ = _stack(case, [], rng, config, point)
        assert targets.shape == (config.stack, config.crop, config.crop)
        focused += bool((targets == opll).any())
        random += bool((_stack(case, [], rng, config)[1] == opll).any())
    assert focused == 20 and random <= 2


def test_a_ct_run_with_a_focused_stack_trains_on_it(tmp_path):
    """Two small CT cases, one with OPLL: --focus-stacks 1 adds a stack to every batch (the loss changes from the
    first step), and a run without it is the recipe's own."""
    rng = np.random.default_rng(0)
    paths = []
    for n in range(2):
        labels = np.zeros((12, 48, 48), dtype=np.uint8)
        labels[:, 12:36, 12:36] = SEG_LABELS[Modality.CT].index("vertebral_body")
        if n == 1:
            labels[4:8, 38:41, 20:28] = SEG_LABELS[Modality.CT].index("opll")
        image = (labels > 0).astype(np.float16) + rng.normal(0, 0.1, labels.shape).astype(np.float16)
        paths.append(tmp_path / f"case-{n}.npz")
        np.savez(paths[-1], ct_image=image, ct_labels=labels)

    def history(focus_stacks: int, name: str) -> list[float]:
        config = SegConfig.for_modality(
            Modality.CT, steps=4, stack=4, crop=32, widths=(4, 8, 16, 32), cases=2, focus_stacks=focus_stacks
        )
        torch.manual_seed(0)
        net = UNet2D(SEG_GEOMETRY[Modality.CT].channels, len(SEG_LABELS[Modality.CT]), config.widths)
        run = Run(tmp_path / f"{name}.pt", dataclasses.asdict(config) | {"modality": "CT"})
        state = torch.load(seg_loop(config, paths, net, run, False, None), weights_only=False)
        return [h["loss"] for h in state["history"]]

    plain, focused = history(0, "plain"), history(1, "focused")
    assert len(plain) == len(focused) == 4 and np.isfinite(plain + focused).all()
    assert history(0, "again") == plain  # the same weights and batches again
    assert plain[0] != focused[0]


@pytest.mark.parametrize(("tumor_labels", "box_prior"), [("box", "core"), ("box", "ellipsoid"), ("mask", "core")])
def test_segmentation_training_on_phantom_cases_makes_the_loss_fall(cache, tmp_path, tumor_labels, box_prior):
    done = train_models(
        ["seg_ct"],
        SMOKE,
        cache,
        tmp_path,
        workers=1,
        progress=False,
        steps=40,
        tumor_labels=tumor_labels,
        box_prior=box_prior,
        lr=5e-3,
    )
    history = [h["loss"] for h in torch.load(done["seg_ct"], weights_only=False)["history"]]
    assert len(history) == 40
    assert np.mean(history[-10:]) < 0.9 * np.mean(history[:10])


def test_a_second_round_fine_tunes_the_first_rounds_export(cache, tmp_path):
    """A model with a second round (make train's CT model): the first round is checkpointed and exported in its own
    folder (computing what the checkpoint does), the second starts from that export and is the checkpoint that
    cspine export takes; a rerun resumes both without training again."""
    preset = dataclasses.replace(SMOKE, second_round={"seg_ct": {"steps": 3, "lr": 1e-3, "focus_stacks": 1}})
    done = train_models(["seg_ct"], preset, cache, tmp_path, workers=1, progress=False, steps=4)
    assert done["seg_ct"] == tmp_path / "seg_ct.pt"
    first = torch.load(tmp_path / FIRST_ROUND / "seg_ct.pt", weights_only=False)
    second = torch.load(done["seg_ct"], weights_only=False)
    assert first["step"] == first["config"]["steps"] == 4 and first["config"]["focus_stacks"] == 0
    assert second["step"] == second["config"]["steps"] == 3
    assert (second["config"]["lr"], second["config"]["focus_stacks"], second["config"]["first_round"]) == (1e-3, 1, 4)
    start = tmp_path / FIRST_ROUND / "seg_ct" / "1" / "model.onnx"
    assert second["config"]["start"] == str(start)
    first_net, _ = load_seg(tmp_path / FIRST_ROUND / "seg_ct.pt")
    exported, _ = load_seg_onnx(start)
    x = torch.from_numpy(random_inputs(seg_spec(Modality.CT), 2)[0])
    with torch.no_grad():
        np.testing.assert_allclose(exported(x).numpy(), first_net(x).numpy(), atol=1e-4)
    stamp = done["seg_ct"].stat().st_mtime_ns
    assert train_models(["seg_ct"], preset, cache, tmp_path, workers=1, progress=False, steps=4) == done
    assert done["seg_ct"].stat().st_mtime_ns == stamp

    first_only = tmp_path / "stopped"
    stopped = train_models(["seg_ct"], preset, cache, first_only, workers=1, progress=False, steps=4, stop_after=2)
    assert stopped["seg_ct"] == first_only / FIRST_ROUND / "seg_ct.pt"  # the first round is not done yet
    assert not (first_only / "seg_ct.pt").exists()


def test_episodic_embedding_training_makes_the_loss_fall(cache, tmp_path):
    # 60 seeded 3-way episodes on the smoke bank: the last 15 losses average 0.54-0.69 of the first 15 over seeds
    # 0-5 (0.61 at seed 0); with lr 0 the ratio is 0.83 and the late mean stays at chance, ln 3 = 1.10.
    embed = {**SMOKE.embed, "episodes": 60, "queries": 2, "seed": 0}
    preset = dataclasses.replace(SMOKE, embed=embed)
    done = train_models(["lesion_embed"], preset, cache, tmp_path, workers=1, progress=False)
    state = torch.load(done["lesion_embed"], weights_only=False)
    assert state["step"] == embed["episodes"]
    history = [h["loss"] for h in state["history"]]
    assert len(history) == embed["episodes"] and np.isfinite(history).all()
    early, late = np.mean(history[:15]), np.mean(history[-15:])
    assert late < 0.75 * early, (early, late)
    assert late < 0.75 * np.log(embed["ways"]), late  # below chance for a 3-way episode, not only below the start
    bank = lesion_bank(cache, 2, SEEN_SUBTYPES, SMOKE.embed["per_subtype"], progress=False)
    assert len(bank) == len(SEEN_SUBTYPES) * SMOKE.embed["per_subtype"] and np.isfinite(bank.rois).all()


def test_episodes_of_a_modality_draw_only_lesions_with_an_roi_of_it():
    # Service-cut ROIs are NaN where the pipeline matched no lesion in a modality (evaluation/service_cut.py).
    rois = np.zeros((6, len(Modality), 3, 4, 4), dtype=np.float32)
    rois[[1, 4], 2] = np.nan  # no radiograph lesion
    rois[5, 0] = np.nan  # no CT lesion
    bank = LesionBank(rois, np.array([0, 0, 0, 3, 3, 3]), np.zeros(6, dtype=int))
    members = members_by_modality(bank, [0, 3])
    assert [{code: rows.tolist() for code, rows in m.items()} for m in members] == [
        {0: [0, 1, 2], 3: [3, 4]},
        {0: [0, 1, 2], 3: [3, 4, 5]},
        {0: [0, 2], 3: [3, 5]},
    ]


def test_the_embedding_trains_on_service_cut_rois_exactly_when_its_config_counts_them(cache, tmp_path):
    config = EmbedConfig(**{**SMOKE.embed, "episodes": 3})
    cut = lesion_bank(cache, 2, SEEN_SUBTYPES, SMOKE.embed["per_subtype"], progress=False)
    cut.rois[::2, 2] = np.nan  # as service-cut ROIs are where the pipeline matched no radiograph lesion
    with pytest.raises(ValueError, match="service-cut bank"):
        train_embed(config, cache, tmp_path / "a", progress=False, service_cut=cut)
    counted = dataclasses.replace(config, service_cut_per_subtype=1)
    with pytest.raises(ValueError, match="service-cut bank"):
        train_embed(counted, cache, tmp_path / "b", progress=False)
    state = torch.load(train_embed(counted, cache, tmp_path / "c", progress=False, service_cut=cut), weights_only=False)
    assert state["step"] == 3 and state["config"]["service_cut_per_subtype"] == 1
    assert np.isfinite([h["loss"] for h in state["history"]]).all()


def test_an_interrupted_run_resumes_to_the_same_weights(cache, tmp_path):
    whole = train_models(["seg_xr"], SMOKE, cache, tmp_path / "a", workers=1, progress=False, steps=4)["seg_xr"]
    train_models(["seg_xr"], SMOKE, cache, tmp_path / "b", workers=1, progress=False, steps=4, stop_after=2)
    assert torch.load(tmp_path / "b" / "seg_xr.pt", weights_only=False)["step"] == 2
    resumed = train_models(["seg_xr"], SMOKE, cache, tmp_path / "b", workers=1, progress=False, steps=4)["seg_xr"]
    a = torch.load(whole, weights_only=False)
    b = torch.load(resumed, weights_only=False)
    assert b["step"] == 4 and [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    for key, value in a["modules"]["net"].items():
        assert torch.equal(value, b["modules"]["net"][key]), key


@pytest.mark.parametrize("modality", list(Modality))
def test_exported_segmentation_matches_pytorch_and_ends_in_uint8_labels(tmp_path, modality):
    g = SEG_GEOMETRY[modality]
    net = _calibrated(
        UNet2D(g.channels, len(SEG_LABELS[modality]), (4, 8, 16, 32), modality is Modality.XR),
        torch.randn(4, g.channels, g.size, g.size),
    )
    path = export_seg(net, modality, tmp_path, {})
    for batch in (1, 3):
        parity = check_parity(SegExport(net), seg_spec(modality), path, random_inputs(seg_spec(modality), batch))
        assert parity["labels_agreement"] >= PARITY["labels_agreement"]
        assert parity["max_abs_diff"] <= PARITY["atol"]  # the pooled encoder features (competence check)


def test_exported_embedding_and_prototype_classifier_match_pytorch(tmp_path):
    encoder = _calibrated(LesionEncoder((8, 16, 24, 32)), torch.randn(6, 3, 64, 64), torch.eye(3)[[0, 1, 2, 0, 1, 2]])
    path = export_embed(encoder, tmp_path, {})
    parity = check_parity(
        EmbedExport(encoder), LESION_EMBED, path, (random_inputs(LESION_EMBED, 5)[0], one_hot_batch(5))
    )
    assert parity["max_abs_diff"] <= PARITY["atol"]
    proto = ProtoClassifier(scale=7.0)
    path = export_proto(proto, tmp_path, {})
    rng = np.random.default_rng(0)
    for n, k in ((1, 2), (6, 5)):  # K changes at run time: prototypes are an input
        inputs = (rng.standard_normal((n, 64)).astype(np.float32), rng.standard_normal((k, 64)).astype(np.float32))
        parity = check_parity(proto, PROTO_CLASSIFY, path, inputs)
        assert parity["max_abs_diff"] <= PARITY["atol"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_onnx_artifacts_agree_with_the_specs(name):
    spec = MODELS[name]
    model = onnx.load(str(model_path(REPOSITORY, name)))
    onnx.checker.check_model(model)
    graph_inputs = {i.name: i for i in model.graph.input}
    graph_outputs = {o.name: o for o in model.graph.output}
    assert set(graph_inputs) == {t.name for t in spec.inputs}
    assert set(graph_outputs) == {t.name for t in spec.outputs}
    for tensor, graph in [
        *((t, graph_inputs[t.name]) for t in spec.inputs),
        *((t, graph_outputs[t.name]) for t in spec.outputs),
    ]:
        ttype = graph.type.tensor_type
        assert ttype.elem_type == ONNX_DTYPES[tensor.dtype]
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        expected = [-1, *tensor.shape] if spec.max_batch_size > 0 else list(tensor.shape)
        assert dims == expected, (tensor.name, dims, expected)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["synthetic_training_data"] == "true"


def test_shipped_models_fit_the_size_budget():
    total = sum(model_path(REPOSITORY, name).stat().st_size for name in MODELS)
    assert total <= 30 * 1024 * 1024


def test_evaluation_figures_come_from_the_models(cache):
    """The shipped models against randomly initialised ones of the same shape, on held-out cases."""
    cases = eval_cohort(cache, EVAL_SEED, 3)
    shipped = seg_metrics(cases, {Modality.CT: onnx_seg(model_path(REPOSITORY, "seg_ct"))}, None)
    random_net = _calibrated(UNet2D(3, len(SEG_LABELS[Modality.CT])), torch.randn(2, 3, 160, 160))
    random = seg_metrics(cases, {Modality.CT: torch_seg(random_net)}, None)
    assert shipped["seg_dice"]["ct"]["vertebral_body"] > 0.7
    assert shipped["seg_dice"]["ct"]["vertebral_body"] > random["seg_dice"]["ct"]["vertebral_body"] + 0.4

    pool = lesion_bank(cache, FEWSHOT_BANK_SEED, UNSEEN_SUBTYPES, SMOKE.fewshot_pool, (0.5, 0.5), progress=False)
    classify = proto_classifier(REPOSITORY)
    good = fewshot_metrics(
        pool, onnx_embed(model_path(REPOSITORY, "lesion_embed")), classify, None, (5,), 40, queries=3
    )

    def blind_embed(rois: np.ndarray, modality: np.ndarray) -> np.ndarray:
        # the same embedding for every lesion: whatever the pool, the figure must fall to chance
        return np.tile(np.eye(1, 64, dtype=np.float32), (len(rois), 1))

    blind = fewshot_metrics(pool, blind_embed, classify, None, (5,), 40, queries=3)
    assert good["fewshot"]["prototype"]["5"]["mean"] > 0.7
    assert blind["fewshot"]["prototype"]["5"]["mean"] < 0.45


def test_cli_evaluate_models_json_has_the_keys_integrators_read(cache):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cspine",
            "evaluate",
            "models",
            "--preset",
            "smoke",
            "--cache",
            str(cache),
            "--repository",
            str(REPOSITORY),
            "--json",
            "--quiet",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout)
    assert set(metrics) >= {"seg_dice", "lesion_dice_box", "lesion_dice_mask", "lesion_size_mae_mm", "fewshot"}
    assert set(metrics["seg_dice"]) == {"ct", "mr", "xr"}
    assert set(metrics["fewshot"]) == {"prototype", "baseline"}
    for by_k in metrics["fewshot"].values():
        for value in by_k.values():
            assert 0.0 <= value["ci95"][0] <= value["mean"] <= value["ci95"][1] <= 1.0 + 1e-9


def test_evaluate_segmentation_puts_a_trained_checkpoint_beside_the_shipped_models(cache, tmp_path):
    """A checkpoint trained for 2 smoke steps beside the shipped CT model on 3 held-out studies (2 with a tumor):
    the figures are each model's own, and the checkpoint's difference to the shipped model is paired."""
    done = train_models(["seg_ct"], SMOKE, cache, tmp_path, workers=1, progress=False, steps=2)

    def evaluate(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "cspine", "evaluate", "segmentation", "--cache", str(cache), "--json", *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    run = evaluate("--checkpoint", f"tiny={done['seg_ct']}", "--studies", "3")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["synthetic"] is True and "seed 9001 (3)" in result["measured_on"]
    assert result["reference"] == {"CT": "seg_ct"}
    models = result["models"]
    assert set(models) == {"seg_ct", "seg_ct_mask", "tiny"}  # only the checkpoints' modality is run
    shipped, tiny = models["seg_ct"], models["tiny"]
    assert shipped["lesion_dice"]["ct"]["cases"] == tiny["lesion_dice"]["ct"]["cases"] == 2
    assert "minus_reference" not in shipped["lesion_dice"]["ct"]
    assert shipped["lesion_dice"]["ct"]["mean"] > 0.3 > tiny["lesion_dice"]["ct"]["mean"]
    difference = tiny["lesion_dice"]["ct"]["minus_reference"]
    assert difference == pytest.approx(
        tiny["lesion_dice"]["ct"]["mean"] - shipped["lesion_dice"]["ct"]["mean"], abs=2e-4
    )
    low, high = tiny["lesion_dice"]["ct"]["minus_reference_ci95"]
    assert low <= difference <= high < 0
    assert shipped["structure_dice"]["vertebral_body"] > 0.7 > tiny["structure_dice"]["vertebral_body"]
    low, high = shipped["structure_dice_ci95"]["vertebral_body"]
    assert low <= shipped["structure_dice"]["vertebral_body"] <= high
    assert shipped["structure_dice_by_series"]["ct"] == shipped["structure_dice"]  # CT has one series
    assert shipped["size_mae_mm"] >= abs(shipped["size_bias_mm"])
    for entry in models.values():  # one of the three studies has no tumor; a structure none has is counted in all
        absent = entry["marked_where_absent"]
        assert absent["tumor"]["of"] == 1 and absent["tumor"]["series"] in (0, 1)
        assert (absent["tumor"]["median_mm3"] >= 10.0) == (absent["tumor"]["series"] == 1)
        assert set(absent) <= set(SEG_LABELS[Modality.CT][1:])
    assert shipped["marked_where_absent"]["tumor"]["series"] == 0

    nothing = evaluate("--checkpoint", f"tiny={done['seg_ct']}", "--studies-from", str(tmp_path))
    assert nothing.returncode != 0 and "no phantom case folders" in nothing.stderr
    clash = evaluate("--checkpoint", f"seg_ct={done['seg_ct']}")
    assert clash.returncode != 0 and "shipped model" in clash.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = evaluate("--checkpoint", f"junk={tmp_path / 'junk.pt'}")
    assert junk.returncode != 0 and "not a segmentation checkpoint" in junk.stderr and "Traceback" not in junk.stderr
