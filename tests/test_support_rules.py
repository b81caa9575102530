"""How a site's support cases and cspine's SYNTHETIC default cases make the prototypes (docs/support.md): the rule's
arithmetic, a class new to the site, the per-modality fallback, the store's versions through a real SQLite file,
GetPrototypeSet and `cspine support show` through the real gateway, and what 5 site cases per class do to the
probabilities of the shipped prototype classifier."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from cspine.analysis.fusion import Calibration
from cspine.config import ServeConfig
from cspine.domain import Modality
from cspine.fewshot.adapt import classifier_scale, exported_scale, pooling_weights, softmax_probabilities
from cspine.fewshot.prototypes import (
    SHIPPED_METHOD,
    SITE_CASES_TO_FIT,
    SITE_CASES_TO_FIT_FUSION,
    SITE_CASES_TO_REPLACE,
    Adaptation,
    PrototypeSet,
    SupportSet,
    default_prototypes,
    site_prototypes,
    site_weight,
)
from cspine.fewshot.store import SupportStore
from cspine.inference.local_triton import default_repository
from cspine.inference.runner import onnx_session
from cspine.inference.specs import EMBEDDING_DIM, MODALITY_ORDER
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import support_pb2 as spb
from cspine.v1 import support_pb2_grpc as spb_grpc
from support.server import GatewayThread
from support.tokens import ANALYST_TOKEN

CT, MR, XR = Modality.CT, Modality.MR, Modality.XR
_uids = itertools.count(1)


def cases(label: str, n: int, centre: float, modalities=MODALITY_ORDER, seed: int = 0) -> SupportSet:
    """``n`` cases of ``label``: embeddings around ``centre`` (every coordinate), NaN for modalities not given."""
    rng = np.random.default_rng(seed)
    embeddings = np.full((n, len(MODALITY_ORDER), EMBEDDING_DIM), np.nan, dtype=np.float32)
    for m, modality in enumerate(MODALITY_ORDER):
        if modality in modalities:
            embeddings[:, m] = centre + 0.01 * rng.normal(size=(n, EMBEDDING_DIM))
    return SupportSet(embeddings, (label,) * n)


def joined(*sets: SupportSet) -> SupportSet:
    return SupportSet(np.concatenate([s.embeddings for s in sets]), sum((s.labels for s in sets), ()))


def mean(support: SupportSet, modality: Modality) -> np.ndarray:
    return np.nanmean(support.embeddings[:, MODALITY_ORDER.index(modality)].astype(np.float64), axis=0)


# -- the rule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "w"), [(0, 0.0), (1, 0.05), (5, 0.25), (10, 0.5), (20, 1.0), (25, 1.0)])
def test_n_site_cases_weigh_min_n_k_over_k_against_the_default_class_mean(n, w):
    assert SITE_CASES_TO_REPLACE == 20
    benign_default, malignant_default = cases("benign", 40, 0.1, seed=1), cases("malignant", 30, -0.3, seed=2)
    site = cases("benign", n, 0.5, seed=3)
    prototypes = site_prototypes(joined(benign_default, malignant_default), site, "v9")
    assert prototypes.version == "v9" and prototypes.labels == ("benign", "malignant")
    for modality in MODALITY_ORDER:
        expected = (1 - w) * mean(benign_default, modality) + (w * mean(site, modality) if n else 0)
        np.testing.assert_allclose(prototypes.prototypes[modality][0], expected, rtol=1e-5, atol=1e-6)
        # no site cases of malignant: the default's mean
        np.testing.assert_allclose(prototypes.prototypes[modality][1], mean(malignant_default, modality), rtol=1e-5)
        assert prototypes.site_weight_of("benign", modality) == pytest.approx(w)
        assert prototypes.site_weight_of("malignant", modality) == 0.0
    benign, malignant = prototypes.composition
    assert (benign.label, benign.site_cases, benign.default_cases) == ("benign", n, 40)
    assert [(x.modality, x.site_cases, x.default_cases) for x in benign.modalities] == [
        (m, n, 40) for m in MODALITY_ORDER
    ]
    assert (malignant.site_cases, malignant.default_cases) == (0, 30)


def test_the_worked_example_of_the_docs():
    # default benign mean 0.10, site benign mean 0.50 (docs/support.md): 0.10, 0.12, 0.20, 0.30, 0.50, 0.50
    for n, expected in [(0, 0.10), (1, 0.12), (5, 0.20), (10, 0.30), (20, 0.50), (30, 0.50)]:
        w = site_weight(n, 48)
        assert w * 0.50 + (1 - w) * 0.10 == pytest.approx(expected)
    assert round((5 * 0.50 + 48 * 0.10) / 53, 2) == 0.14  # the old mean over every case
    assert site_weight(1, 0) == site_weight(3, 0) == 1.0  # no default cases: the site's alone
    assert site_weight(0, 0) == 0.0
    with pytest.raises(ValueError, match="K must be at least 1"):
        site_weight(1, 1, k=0)


def test_a_class_new_to_the_site_stands_on_its_own_5_cases():
    default = joined(cases("benign", 40, 0.1, seed=1), cases("malignant", 30, -0.3, seed=2))
    chordoma = cases("chordoma", 5, 0.7, seed=4)
    prototypes = site_prototypes(default, chordoma)
    assert prototypes.labels == ("benign", "malignant", "chordoma")
    assert prototypes.version.startswith("site-")
    for modality in MODALITY_ORDER:
        np.testing.assert_allclose(prototypes.prototypes[modality][2], mean(chordoma, modality), rtol=1e-5)
        assert prototypes.site_weight_of("chordoma", modality) == 1.0
    assert prototypes.composition[2].site_cases == 5 and prototypes.composition[2].default_cases == 0
    one = site_prototypes(default, cases("chordoma", 1, 0.7, seed=5))  # even one case: nothing to shrink toward
    assert one.site_weight_of("chordoma", CT) == 1.0


def test_a_modality_the_site_cases_lack_keeps_the_default_and_each_modality_is_shrunk_by_its_own_count():
    default = joined(cases("benign", 40, 0.1, seed=1), cases("malignant", 30, -0.3, seed=2))
    ct_only = cases("benign", 2, 0.5, modalities=(CT,), seed=6)
    ct_mr = cases("benign", 1, 0.5, modalities=(CT, MR), seed=7)
    site = joined(ct_only, ct_mr)
    prototypes = site_prototypes(default, site)
    benign_default = cases("benign", 40, 0.1, seed=1)
    for modality, n in [(CT, 3), (MR, 1), (XR, 0)]:
        w = n / SITE_CASES_TO_REPLACE
        expected = (1 - w) * mean(benign_default, modality) + (w * mean(site, modality) if n else 0)
        np.testing.assert_allclose(prototypes.prototypes[modality][0], expected, rtol=1e-5, atol=1e-6)
        assert prototypes.site_weight_of("benign", modality) == pytest.approx(w)
    benign = prototypes.composition[0]
    assert benign.site_cases == 3 and [(x.modality, x.site_cases) for x in benign.modalities] == [
        (CT, 3),
        (MR, 1),
        (XR, 0),
    ]
    # a new class without radiographs: no class may lack a prototype, so the set has none of XR
    lacking = site_prototypes(default, cases("chordoma", 5, 0.7, modalities=(CT, MR), seed=8))
    assert set(lacking.prototypes) == {CT, MR}
    assert [x.modality for x in lacking.composition[2].modalities] == [CT, MR]


def test_a_set_of_one_kind_keeps_its_plain_means_and_its_name_and_the_set_is_immutable():
    default = SupportSet.load()
    prototypes = default_prototypes()
    assert prototypes.version == PrototypeSet.from_support(default).version
    assert prototypes.version.startswith("default-")
    as_site = PrototypeSet.from_cases(default, [False] * len(default.labels))
    for modality in MODALITY_ORDER:
        for c, label in enumerate(prototypes.labels):
            rows = default.embeddings[np.array(default.labels) == label, MODALITY_ORDER.index(modality)]
            rows = rows[~np.isnan(rows).any(axis=1)]  # the cases with a lesion of this modality
            np.testing.assert_array_equal(prototypes.prototypes[modality][c], rows.mean(axis=0))
        np.testing.assert_array_equal(as_site.prototypes[modality], prototypes.prototypes[modality])
    assert as_site.version == prototypes.version  # the same prototypes, the same name
    assert all(c.site_cases == 0 and c.default_cases > 0 for c in prototypes.composition)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prototypes.version = "v2"  # type: ignore[misc]
    with pytest.raises(ValueError, match="synthetic flags"):
        PrototypeSet.from_cases(default, [True])


def test_site_cases_per_class_change_the_probabilities_where_the_old_mean_barely_moved_them():
    """The issue's finding, reproduced and fixed: site lesions of each class lie where the default puts another
    class. With all cases averaged alike (the old rule) 5 site cases per class change nothing; now K of them make
    the prototypes alone, and 5 of them, fitted as the service fits them, decide most answers."""
    default = SupportSet.load()
    base = default_prototypes()
    classify = onnx_session(default_repository() / "proto_classify" / "1" / "model.onnx")
    rng = np.random.default_rng(11)
    centres = {m: base.prototypes[m][[1, 2, 0]] for m in MODALITY_ORDER}  # class c looks like the default's c + 1
    ct = base.prototypes[CT]
    closest = min(np.linalg.norm(ct[i] - ct[j]) for i in range(3) for j in range(i + 1, 3))
    spread = 1.2 * closest / np.sqrt(EMBEDDING_DIM)  # noise about 1.2 times the closest CT prototypes' distance

    def draw(c: int, n: int) -> np.ndarray:
        x = np.stack([centres[m][c] + spread * rng.normal(size=(n, EMBEDDING_DIM)) for m in MODALITY_ORDER], axis=1)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    k = SITE_CASES_TO_REPLACE
    site = SupportSet(np.concatenate([draw(c, k) for c in range(3)]), tuple(np.repeat(base.labels, k)))
    new = site_prototypes(default, site)
    for modality in MODALITY_ORDER:
        site_means = [site.embeddings[k * c : k * c + k, MODALITY_ORDER.index(modality)].mean(0) for c in range(3)]
        np.testing.assert_allclose(new.prototypes[modality], np.stack(site_means), rtol=1e-6)
    five = SupportSet(np.concatenate([draw(c, 5) for c in range(3)]), tuple(np.repeat(base.labels, 5)))
    old = PrototypeSet.from_support(joined(default, five))  # every case alike, as before the rule
    fitted = site_prototypes(default, five, adaptation=Adaptation("fitted", exported_scale(PROTO_CLASSIFY)))
    queries = np.concatenate([draw(c, 20) for c in range(3)])[:, 0]  # CT lesions of the same site
    truth = np.repeat(np.arange(3), 20)

    def probabilities(prototypes: PrototypeSet) -> np.ndarray:
        return classify.run(None, {"embedding": queries, "prototypes": prototypes.prototypes[CT]})[0]

    before, after, averaged = probabilities(base), probabilities(new), probabilities(old)
    assert (before.argmax(1) == truth).mean() < 0.2 and (averaged.argmax(1) == truth).mean() < 0.2
    assert np.median(np.abs(averaged - before)) < 0.1  # the issue: 5 site cases barely moved anything
    assert (after.argmax(1) == truth).mean() > 0.95
    assert np.median(np.abs(after - before)) > 0.3
    assert np.median(after[np.arange(60), truth]) - np.median(before[np.arange(60), truth]) > 0.5
    adapted = probabilities(fitted)  # 5 per class weigh 25 % in the rule; the fit to them moves the rest
    assert (adapted.argmax(1) == truth).mean() > 0.8
    assert np.median(adapted[np.arange(60), truth]) - np.median(before[np.arange(60), truth]) > 0.3


# -- the fitted adaptation -----------------------------------------------------------------------------------

PROTO_CLASSIFY = default_repository() / "proto_classify" / "1" / "model.onnx"


def test_the_exported_classifier_s_scale_is_read_from_its_onnx_model():
    session = onnx_session(PROTO_CLASSIFY)
    scale = exported_scale(PROTO_CLASSIFY)
    assert scale == pytest.approx(
        classifier_scale(lambda e, p: session.run(None, {"embedding": e, "prototypes": p})[0])
    )
    assert 1.0 < scale < 100.0  # trained from 10; a softmax of -scale · d²
    # what `cspine serve` gives its store: the shipped method, by default
    assert ServeConfig().prototype_adaptation == SHIPPED_METHOD == "fitted"
    calibration = Calibration.load(default_repository()).classification_weights
    assert Adaptation.of_repository("fitted", default_repository()) == Adaptation(
        "fitted", scale, tuple(calibration[m] for m in MODALITY_ORDER)
    )
    assert Adaptation.of_repository("plain", default_repository()) == Adaptation("plain")
    embeddings = np.random.default_rng(3).normal(size=(4, EMBEDDING_DIM)).astype(np.float32) * 0.1
    prototypes = np.random.default_rng(4).normal(size=(3, EMBEDDING_DIM)).astype(np.float32) * 0.1
    np.testing.assert_allclose(
        softmax_probabilities(embeddings, prototypes, scale),
        session.run(None, {"embedding": embeddings, "prototypes": prototypes})[0],
        atol=1e-5,
    )


def test_the_fitted_adaptation_moves_the_prototypes_to_classify_the_site_cases_and_leaves_fewer_cases_alone():
    default = SupportSet.load()
    fitted = Adaptation("fitted", exported_scale(PROTO_CLASSIFY))
    alone = PrototypeSet.from_support(default)
    same = PrototypeSet.from_cases(default, [True] * len(default.labels), adaptation=fitted)
    assert same.version == alone.version and same.adaptation == alone.adaptation == "plain"
    for modality in MODALITY_ORDER:
        np.testing.assert_array_equal(same.prototypes[modality], alone.prototypes[modality])
    base = default_prototypes()
    rng = np.random.default_rng(21)
    # the site's lesions of class c lie between the default's c and c + 1: the rule's means misplace some
    centres = np.stack([0.5 * (base.prototypes[m] + base.prototypes[m][[1, 2, 0]]) for m in MODALITY_ORDER], axis=1)
    noise = 0.08 * rng.normal(size=(15, len(MODALITY_ORDER), EMBEDDING_DIM))
    site = SupportSet((np.repeat(centres, 5, axis=0) + noise).astype(np.float32), tuple(np.repeat(base.labels, 5)))
    plain, adapted = site_prototypes(default, site), site_prototypes(default, site, adaptation=fitted)
    assert plain.adaptation == "plain" and adapted.adaptation == "fitted to 15 site cases"
    assert adapted.version != plain.version and adapted.composition == plain.composition
    truth = np.repeat(np.arange(3), 5)

    def loss(prototypes: np.ndarray, m: int) -> float:
        p = softmax_probabilities(site.embeddings[:, m], prototypes, fitted.scale)
        return float(-np.log(p[np.arange(15), truth]).mean())

    for m, modality in enumerate(MODALITY_ORDER):
        moved = np.linalg.norm(adapted.prototypes[modality] - plain.prototypes[modality], axis=1)
        assert (moved > 1e-4).all()
        assert loss(adapted.prototypes[modality], m) < loss(plain.prototypes[modality], m)
    # one class with a case fewer than SITE_CASES_TO_FIT: the rule's prototypes, not fitted
    assert SITE_CASES_TO_FIT == 5
    fewer = SupportSet(site.embeddings[1:], site.labels[1:])
    unfitted = site_prototypes(default, fewer, adaptation=fitted)
    assert unfitted.adaptation == "plain"
    for modality in MODALITY_ORDER:
        np.testing.assert_array_equal(
            unfitted.prototypes[modality], site_prototypes(default, fewer).prototypes[modality]
        )
    with pytest.raises(ValueError, match="needs the classifier's scale"):
        Adaptation("fitted")
    with pytest.raises(ValueError, match="one of plain, fitted"):
        Adaptation("meta")


def _pooled_nll(held_out: np.ndarray, truth: np.ndarray, w: np.ndarray) -> float:
    z = np.tensordot(held_out, w, axes=([1], [0]))
    z = z - z.max(1, keepdims=True)
    return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(truth)), truth]).mean())


def test_pooling_weights_raise_an_informative_modality_and_drop_a_misleading_one():
    rng = np.random.default_rng(5)
    truth = np.repeat(np.arange(3), 20)
    onehot = np.eye(3)[truth]
    informative = np.log(0.15 + 0.7 * onehot + 0.02 * rng.random((60, 3)))  # right 85 % of the mass, every case
    misleading = np.log(0.15 + 0.7 * onehot[:, [1, 2, 0]])  # the same confidence, always on a wrong class
    held_out = np.stack([informative, misleading, np.zeros((60, 3))], axis=1)  # no case has the third modality
    start = np.array([0.2, 0.2, 0.1])
    w = pooling_weights(held_out, truth, start)
    assert w[0] > 1.0 and w[1] < 0.05 and w[2] == pytest.approx(0.1, abs=1e-3)  # the absent one stays put
    assert _pooled_nll(held_out, truth, w) < _pooled_nll(held_out, truth, start) - 0.3


def test_fitted_refits_the_fusion_weights_once_every_class_has_10_site_cases_on_held_out_folds():
    default = SupportSet.load()
    base = default_prototypes()
    weights = (0.19, 0.23, 0.07)
    fitted = Adaptation("fitted", exported_scale(PROTO_CLASSIFY), weights)
    rng = np.random.default_rng(1)

    def site(per_class: int) -> SupportSet:
        """CT and MR lesions near their class's default prototype; radiographs that say nothing of the class."""
        rows = []
        for c in range(3):
            x = np.stack([base.prototypes[m][c] + 0.05 * rng.normal(size=(per_class, EMBEDDING_DIM)) for m in (CT, MR)])
            xr = base.prototypes[XR].mean(0) + 0.05 * rng.normal(size=(per_class, EMBEDDING_DIM))
            rows.append(np.concatenate([x, xr[None]]).transpose(1, 0, 2))
        return SupportSet(np.concatenate(rows).astype(np.float32), tuple(np.repeat(base.labels, per_class)))

    enough = site(SITE_CASES_TO_FIT_FUSION)
    refitted = site_prototypes(default, enough, adaptation=fitted)
    assert set(refitted.fusion_weights) == {CT, MR, XR}
    assert refitted.fusion_weights[CT] > weights[0] and refitted.fusion_weights[MR] > weights[1]
    assert refitted.fusion_weights[XR] < weights[2]
    assert refitted.adaptation == "fitted to 30 site cases"
    # the same cases by the plain rule, or fitted without the calibration's weights to start from: none refitted
    assert site_prototypes(default, enough, adaptation=Adaptation("plain")).fusion_weights == {}
    assert site_prototypes(default, enough, adaptation=Adaptation("fitted", fitted.scale)).fusion_weights == {}
    fewer = SupportSet(enough.embeddings[np.arange(30) % 10 != 9], tuple(np.repeat(base.labels, 9)))
    assert site_prototypes(default, fewer, adaptation=fitted).fusion_weights == {}
    with pytest.raises(ValueError, match="2 fusion weights for 3 modalities"):
        Adaptation("fitted", 1.0, (0.1, 0.2))


def test_the_store_serves_the_refitted_fusion_weights_and_support_show_prints_them(seeded):
    from cspine.client.decode import format_weights
    from cspine.gateway.convert import version_to_pb

    seeded.adaptation = Adaptation.of_repository("fitted", default_repository())  # as `cspine serve` makes it
    for label, centre in (("benign", 0.05), ("borderline", -0.05), ("malignant", 0.15)):
        number = add_site_cases(seeded, cases(label, 10, centre, seed=int(100 * centre) + 40))
    prototypes = seeded.prototype_set()
    assert set(prototypes.fusion_weights) == {CT, MR, XR}
    info = version_to_pb(seeded.version_info(number), prototypes)
    assert [(w.modality, round(w.weight, 4)) for w in info.fusion_weights] == [
        (pb.CT, prototypes.fusion_weights[CT]),
        (pb.MR, prototypes.fusion_weights[MR]),
        (pb.XR, prototypes.fusion_weights[XR]),
    ]
    assert "fusion weights refitted to the site's cases (held out, 5 folds): CT " in format_weights(info)
    assert f"then fitted to {3 * 10} site cases" in format_weights(info)
    assert not version_to_pb(seeded.version_info(1), seeded.prototype_set(1)).fusion_weights


# -- the store and the gateway --------------------------------------------------------------------------------


def uid() -> str:
    return f"1.2.826.0.1.3680043.10.9998.{next(_uids)}"


def add_site_cases(store: SupportStore, support: SupportSet, create_class: bool = False) -> int:
    number = 0
    for row, label in zip(support.embeddings, support.labels, strict=True):
        embeddings = {m: row[i] for i, m in enumerate(MODALITY_ORDER) if not np.isnan(row[i]).any()}
        number = store.add_case(
            uid(), label, embeddings, pathology_reference="biopsy 7", curator="dr site", create_class=create_class
        )
    return number


@pytest.fixture
def seeded(tmp_path):
    with SupportStore(f"sqlite:///{tmp_path / 'support.db'}") as store:
        store.migrate()
        store.seed_defaults(SupportSet.load())
        yield store


def test_the_store_makes_each_version_by_the_rule(seeded):
    default = SupportSet.load()
    base = default_prototypes()
    benign_cases = default.labels.count("benign")
    benign_default = SupportSet(default.embeddings[np.array(default.labels) == "benign"], ("benign",) * benign_cases)
    site = cases("benign", 8, 0.05, seed=9)
    one = add_site_cases(seeded, SupportSet(site.embeddings[:1], site.labels[:1]))
    four = add_site_cases(seeded, SupportSet(site.embeddings[1:4], site.labels[1:4]))
    five = add_site_cases(seeded, SupportSet(site.embeddings[4:5], site.labels[4:5]))
    eight = add_site_cases(seeded, SupportSet(site.embeddings[5:], site.labels[5:]))
    assert (one, four, five, eight) == (2, 5, 6, 9)
    for number, n in [(1, 0), (one, 1), (four, 4), (five, 5), (eight, 8)]:
        prototypes = seeded.prototype_set(number)
        assert prototypes.version == f"v{number}" and prototypes.labels == base.labels
        w = min(n, SITE_CASES_TO_REPLACE) / SITE_CASES_TO_REPLACE
        first = SupportSet(site.embeddings[:n], site.labels[:n])
        for modality in MODALITY_ORDER:
            expected = mean(benign_default, modality) * (1 - w) + (w * mean(first, modality) if n else 0)
            np.testing.assert_allclose(prototypes.prototypes[modality][0], expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(prototypes.prototypes[modality][1:], base.prototypes[modality][1:])
        benign = prototypes.composition[0]
        assert (benign.site_cases, benign.default_cases) == (n, benign_cases)
        assert [x.site_weight for x in benign.modalities] == pytest.approx([w] * 3)
    chordoma = cases("chordoma", 5, 0.3, seed=10)
    number = add_site_cases(seeded, chordoma, create_class=True)
    prototypes = seeded.prototype_set()
    assert prototypes.labels[-1] == "chordoma" and prototypes.version == f"v{number}"
    np.testing.assert_allclose(prototypes.prototypes[CT][-1], mean(chordoma, CT), rtol=1e-5)
    # the default's malignant cases removed, one site case stands alone: no default left to shrink toward
    malignant = add_site_cases(seeded, cases("malignant", 1, -0.2, seed=12))
    assert seeded.prototype_set(malignant).site_weight_of("malignant", CT) == pytest.approx(1 / SITE_CASES_TO_REPLACE)
    for case in seeded.list_cases():
        if case.synthetic and case.label == "malignant":
            seeded.remove_case(case.id, curator="dr site")
    alone = seeded.prototype_set()
    assert alone.site_weight_of("malignant", CT) == 1.0
    assert alone.labels == ("benign", "borderline", "chordoma", "malignant")  # in the order of each class's first case
    np.testing.assert_allclose(alone.prototypes[CT][3], mean(cases("malignant", 1, -0.2, seed=12), CT), rtol=1e-6)


def test_get_prototype_set_and_support_show_give_each_class_its_cases_and_weights(triton, seeded, capsys):
    from cspine.cli import main

    add_site_cases(seeded, cases("benign", 5, 0.05, seed=13))
    add_site_cases(seeded, cases("borderline", 1, 0.05, modalities=(CT, MR), seed=14))
    add_site_cases(seeded, cases("chordoma", 5, 0.3, modalities=(CT, MR), seed=15), create_class=True)
    seeded.adaptation = Adaptation("fitted", exported_scale(PROTO_CLASSIFY))  # as `cspine serve` makes its store
    server = GatewayThread(triton.grpc_url, store=seeded)
    try:
        analyst = spb_grpc.SupportSetStub(server.channel)
        info = analyst.GetPrototypeSet(spb.GetPrototypeSetRequest(), timeout=10)
        default = SupportSet.load()
        assert info.site_cases_to_replace == SITE_CASES_TO_REPLACE and info.cases == len(default.labels) + 11
        assert info.adaptation == "plain"  # borderline has 1 site case, malignant none: fewer than SITE_CASES_TO_FIT
        # the SYNTHETIC default's cases of each class, in all and with an embedding of each modality
        d = {c: default.labels.count(c) for c in ("benign", "borderline", "malignant")}
        dm = {
            (c, m): int((~np.isnan(default.embeddings[np.array(default.labels) == c, i, 0])).sum())
            for c in d
            for i, m in enumerate((pb.CT, pb.MR, pb.XR))
        }
        summary = {
            c.label: (
                c.cases,
                c.site_cases,
                c.default_cases,
                [(w.modality, w.site_cases, w.default_cases) for w in c.weights],
            )
            for c in info.classes
        }
        every = [pb.CT, pb.MR, pb.XR]
        assert summary == {
            "benign": (d["benign"] + 5, 5, d["benign"], [(m, 5, dm["benign", m]) for m in every]),
            "borderline": (
                d["borderline"] + 1,
                1,
                d["borderline"],
                [
                    (pb.CT, 1, dm["borderline", pb.CT]),
                    (pb.MR, 1, dm["borderline", pb.MR]),
                    (pb.XR, 0, dm["borderline", pb.XR]),
                ],
            ),
            "malignant": (d["malignant"], 0, d["malignant"], [(m, 0, dm["malignant", m]) for m in every]),
            "chordoma": (5, 5, 0, [(pb.CT, 5, 0), (pb.MR, 5, 0)]),
        }
        weights = {c.label: [round(w.site_weight, 6) for w in c.weights] for c in info.classes}
        assert weights == {
            "benign": [0.25, 0.25, 0.25],  # 5 of K = 20
            "borderline": [0.05, 0.05, 0.0],
            "malignant": [0.0, 0.0, 0.0],
            "chordoma": [1.0, 1.0],
        }
        assert list(info.modalities) == [pb.CT, pb.MR]  # chordoma has no radiograph
        listed = analyst.ListCases(spb.ListCasesRequest(), timeout=10).prototype_set
        assert listed == info
        old = analyst.GetPrototypeSet(spb.GetPrototypeSetRequest(version=1), timeout=10)
        assert [(c.site_cases, c.default_cases) for c in old.classes] == [(0, n) for n in d.values()]

        assert main(["support", "--server", server.address, "--token", ANALYST_TOKEN, "show"]) == 0
        shown = capsys.readouterr().out.splitlines()
        assert shown[2].split()[:6] == ["class", "site", "default", "CT", "MR", "XR"]
        assert [line.split() for line in shown[3:7]] == [
            ["benign", "5", str(d["benign"]), "25%", "25%", "25%"],
            ["borderline", "1", str(d["borderline"]), "5%", "5%", "0%"],
            ["malignant", "0", str(d["malignant"]), "0%", "0%", "0%"],
            ["chordoma", "5", "0", "100%", "100%", "—"],
        ]
        assert "w = min(n, 20)/20" in shown[7] and "20 site cases replace the default" in shown[8]
        assert len(shown) == 9  # no "then fitted" line
        assert old.adaptation == "plain"
    finally:
        server.close()
