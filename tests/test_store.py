"""The support-case store against a real SQLite file and a real (throwaway) PostgreSQL 15 cluster: versions,
prototypes, refusals, immutable history, concurrent and killed writers, restarts, the SYNTHETIC seed."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from cspine.domain import Modality
from cspine.errors import (
    CaseNotFoundError,
    DuplicateCaseError,
    InvalidInputError,
    StoreUnavailableError,
    UnknownClassError,
)
from cspine.fewshot.prototypes import SupportSet
from cspine.fewshot.store import SITE_SEED_CURATOR, SYNTHETIC_CURATOR, SupportStore, metadata, study_uid_hash
from support.server import free_port

CT, MR, XR = Modality.CT, Modality.MR, Modality.XR
_uids = itertools.count(1)


def uid() -> str:
    return f"1.2.826.0.1.3680043.10.9999.{next(_uids)}"


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=64).astype(np.float32)


def add(store: SupportStore, label: str, embeddings: dict | None = None, **kwargs) -> int:
    kwargs.setdefault("pathology_reference", "biopsy report 17")
    kwargs.setdefault("curator", "dr test")
    return store.add_case(kwargs.pop("study_uid", None) or uid(), label, embeddings or {CT: vec(0)}, **kwargs)


# -- backends ------------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'support.db'}"
    return request.getfixturevalue("postgres")()


@pytest.fixture
def store(url):
    with SupportStore(url) as s:
        s.migrate()
        yield s


# -- tests ---------------------------------------------------------------------------------------------------


def test_add_list_remove_round_trip_makes_versions_1_2_3_with_the_right_members(store):
    assert store.current_version() == 0
    assert add(store, "benign", {CT: vec(1), XR: vec(2)}, create_class=True, note="C4 body") == 1
    assert add(store, "benign", {MR: vec(3)}, curator="dr two") == 2
    first, second = store.list_cases()
    assert (first.label, first.note, first.curator, first.modalities) == ("benign", "C4 body", "dr test", (CT, XR))
    assert (second.curator, second.modalities, second.synthetic) == ("dr two", (MR,), False)
    assert first.created_at.tzinfo is not None and first.created_at <= second.created_at
    assert store.remove_case(first.id, curator="dr three") == 3
    assert [c.id for c in store.list_cases()] == [second.id]
    assert [c.id for c in store.list_cases(1)] == [first.id]
    info = store.version_info()
    assert (info.number, info.created_by, info.change, info.case_count, info.labels) == (
        3,
        "dr three",
        f"remove case {first.id} (benign)",
        1,
        ("benign",),
    )
    assert store.version_info(2).change == f"add case {second.id} (benign)"
    assert store.version_info(1).change == f"add case {first.id} (new class benign)"
    with pytest.raises(CaseNotFoundError, match=f"no case {first.id}"):
        store.remove_case(first.id, curator="dr three")
    with pytest.raises(InvalidInputError, match="no prototype-set version 4"):
        store.prototype_set(4)


def test_prototypes_of_site_cases_alone_equal_the_mean_of_the_members_embeddings(store):
    # no SYNTHETIC default cases: nothing to shrink toward (the rule itself: test_support_rules.py)
    rows = {
        "benign": [{CT: vec(1), MR: vec(2)}, {CT: vec(3)}],
        "malignant": [{CT: vec(4), MR: vec(5)}, {CT: vec(6), MR: vec(7)}, {XR: vec(8)}],
    }
    for label, embeddings in rows.items():
        for e in embeddings:
            add(store, label, e, create_class=True)
    prototypes = store.prototype_set()
    assert prototypes.version == "v5" and prototypes.labels == ("benign", "malignant")
    assert set(prototypes.prototypes) == {CT, MR}  # no benign case has XR
    for modality in (CT, MR):
        expected = [np.mean([e[modality] for e in rows[label] if modality in e], axis=0) for label in prototypes.labels]
        np.testing.assert_allclose(prototypes.prototypes[modality], expected, rtol=1e-6)
    assert [(c.site_cases, c.default_cases) for c in prototypes.composition] == [(2, 0), (3, 0)]
    assert {w.site_weight for c in prototypes.composition for w in c.modalities} == {1.0}


def test_add_case_refuses_a_study_already_in_the_current_set_without_printing_its_uid(store):
    study = uid()
    add(store, "benign", study_uid=study, create_class=True)
    with pytest.raises(DuplicateCaseError, match="already in the current support set as case 1") as caught:
        add(store, "benign", study_uid=study)
    assert study not in str(caught.value)
    assert store.current_version() == 1
    store.remove_case(1, curator="dr test")
    assert add(store, "benign", study_uid=study, create_class=True) == 3  # out of the current set: may return


def test_add_case_refuses_bad_input_and_writes_nothing(store):
    add(store, "benign", create_class=True)
    bad = [
        ({CT: np.ones(63)}, "shape"),
        ({CT: np.full(64, np.nan)}, "NaN"),
        ({"PET": vec(1)}, "unknown modality"),
        ({}, "at least one modality"),
    ]
    for embeddings, reason in bad:
        with pytest.raises(InvalidInputError, match=reason):
            store.add_case(uid(), "benign", embeddings, pathology_reference="r", curator="c")
    for study in ("", "1." * 40):
        with pytest.raises(InvalidInputError, match="not a DICOM UID"):
            store.add_case(study, "benign", {CT: vec(1)}, pathology_reference="r", curator="c")
    with pytest.raises(InvalidInputError, match="pathology_reference is required"):
        store.add_case(uid(), "benign", {CT: vec(1)}, pathology_reference=" ", curator="c")
    with pytest.raises(InvalidInputError, match="pathology_reference is longer than 1024 characters"):
        store.add_case(uid(), "benign", {CT: vec(1)}, pathology_reference="r" * 1025, curator="c")
    with pytest.raises(InvalidInputError, match="note is longer than 4096 characters"):  # 15 MB once broke ListCases
        store.add_case(uid(), "benign", {CT: vec(1)}, pathology_reference="r", curator="c", note="n" * 4097)
    assert store.current_version() == 1


def test_unknown_label_is_refused_unless_create_class_and_the_class_goes_with_its_last_case(store):
    add(store, "benign", create_class=True)
    add(store, "malignant", create_class=True)
    with pytest.raises(UnknownClassError, match="'chordoma' .*benign, malignant"):
        add(store, "chordoma")
    assert store.current_version() == 2
    add(store, "chordoma", create_class=True)
    assert store.prototype_set().labels == ("benign", "malignant", "chordoma")
    (chordoma,) = [c for c in store.list_cases() if c.label == "chordoma"]
    store.remove_case(chordoma.id, curator="dr test")
    assert store.prototype_set().labels == ("benign", "malignant")
    with pytest.raises(UnknownClassError):
        add(store, "chordoma")


def test_older_versions_are_unchanged_after_later_changes(store):
    for i, label in enumerate(["benign", "benign", "malignant", "malignant"]):
        add(store, label, {CT: vec(i), MR: vec(10 + i)}, create_class=True)
    before = store.prototype_set(4), store.list_cases(4), store.version_info(4)
    add(store, "benign", {CT: vec(20)})
    store.remove_case(1, curator="dr test")
    add(store, "borderline", {CT: vec(21), MR: vec(22)}, create_class=True)
    after = store.prototype_set(4), store.list_cases(4), store.version_info(4)
    assert after[1:] == before[1:]
    assert after[0].labels == before[0].labels and after[0].version == "v4"
    for modality in before[0].prototypes:
        np.testing.assert_array_equal(after[0].prototypes[modality], before[0].prototypes[modality])
    assert store.prototype_set().labels == ("benign", "malignant", "borderline")


def test_two_writers_at_once_lose_no_case_and_number_versions_without_gaps_or_duplicates(store, url):
    add(store, "benign", create_class=True)
    barrier = threading.Barrier(2)
    errors = []

    def writer(name: str) -> None:
        try:
            with SupportStore(url) as mine:  # its own engine, as another replica would have
                barrier.wait()
                for i in range(10):
                    add(mine, "benign", {CT: vec(i)}, curator=name)
        except Exception as exc:  # reported below: a failing thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"writer {n}",)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.current_version() == 21
    assert len(store.list_cases()) == 21
    counts = [store.version_info(n).case_count for n in range(1, 22)]
    assert counts == list(range(1, 22))  # each version is the previous one plus exactly one case
    creators = [store.version_info(n).created_by for n in range(2, 22)]
    assert sorted(creators) == ["writer 1"] * 10 + ["writer 2"] * 10


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from cspine.domain import Modality
    from cspine.fewshot.store import SupportStore

    def wait_to_be_killed():
        print("in transaction", flush=True)
        time.sleep(60)

    store = SupportStore(sys.argv[1])
    store._before_commit = wait_to_be_killed
    store.add_case("1.2.3.4.5", "benign", {Modality.CT: np.ones(64)}, pathology_reference="r", curator="killed")
    """
)


def test_a_writer_killed_mid_transaction_leaves_the_previous_version_intact(store, url):
    add(store, "benign", {CT: vec(1)}, create_class=True)
    before = store.prototype_set()
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "in transaction"
        assert store.current_version() == 1  # readers are not blocked by the open write transaction
        child.kill()  # SIGKILL, before COMMIT
        child.wait(timeout=30)
    finally:
        child.kill()
        child.stdout.close()
    assert store.current_version() == 1
    assert [c.curator for c in store.list_cases()] == ["dr test"]
    np.testing.assert_array_equal(store.prototype_set().prototypes[CT], before.prototypes[CT])
    assert add(store, "benign", {CT: vec(2)}, study_uid="1.2.3.4.5") == 2  # the lock went with the writer


def test_a_restart_keeps_every_version_and_case(store, url):
    add(store, "benign", {CT: vec(1)}, create_class=True)
    add(store, "malignant", {CT: vec(2)}, create_class=True)
    store.remove_case(1, curator="dr test")
    expected = [(n, store.list_cases(n), store.version_info(n)) for n in (1, 2, 3)]
    store.close()
    with SupportStore(url) as again:
        again.migrate()  # a no-op on a migrated store
        assert again.current_version() == 3
        assert [(n, again.list_cases(n), again.version_info(n)) for n in (1, 2, 3)] == expected
        assert again.prototype_set().labels == ("malignant",)


def test_seed_defaults_writes_the_120_synthetic_cases_once_even_when_two_replicas_call_it(store, url):
    support = SupportSet.load()
    results = []
    with SupportStore(url) as other:
        threads = [
            threading.Thread(target=lambda s=s: results.append(s.seed_defaults(support))) for s in (store, other)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert sorted(results) == [False, True]
    assert store.seed_defaults(support) is False
    assert store.current_version() == 1
    seeded = store.list_cases()
    assert len(seeded) == len(support.labels) and all(c.synthetic and c.curator == SYNTHETIC_CURATOR for c in seeded)
    assert store.version_info().labels == ("benign", "borderline", "malignant")
    assert store.version_info().created_by == SYNTHETIC_CURATOR
    assert store.prototype_set().labels == tuple(dict.fromkeys(support.labels))


def test_cases_of_another_embedding_stay_listed_but_only_the_served_embeddings_cases_make_the_prototypes(store, url):
    shipped = SupportSet.load()
    assert store.seed_defaults(shipped) is True and store.current_version() == 1
    site_study = uid()
    add(store, "benign", {CT: vec(1)}, study_uid=site_study)
    before = store.prototype_set()
    # the same database, served with a version set whose lesion embedding was fine-tuned
    tuned = SupportSet(shipped.embeddings[:6] + 1.0, shipped.labels[:6], False, "train lesions of cohort x", site=True)
    with SupportStore(url, embedding="0123456789abcdef") as other:
        assert other.prototype_set().labels == ()  # no case of this embedding yet
        assert other.seed_defaults(tuned) is True and other.seed_defaults(tuned) is False
        assert other.current_version() == 3
        info = other.version_info()
        assert info.change == "seed the version's own cases from its cohort of embedding 0123456789abcdef (6 cases)"
        assert info.created_by == SITE_SEED_CURATOR == "cspine (a version's own cases, from the site's cohort)"
        listed = other.list_cases()
        mine = [c for c in listed if c.in_use]
        assert len(listed) == len(shipped.labels) + 1 + 6 and len(mine) == 6
        assert all(c.embedding == "0123456789abcdef" and c.note == "train lesions of cohort x" for c in mine)
        assert not any(c.synthetic for c in mine) and {c.pathology_reference for c in mine} == {"the cohort's manifest"}
        assert {c.embedding for c in listed if not c.in_use} == {""}
        prototypes = other.prototype_set()
        # the site's own cases: a case the curator adds joins them (no default cases to replace)
        assert prototypes.composition[0].site_cases == 6 and prototypes.composition[0].default_cases == 0
        # the site's study is added again, embedded anew; a second time it is a duplicate
        assert add(other, "benign", {CT: vec(2)}, study_uid=site_study) == 4
        with pytest.raises(DuplicateCaseError):
            add(other, "benign", {CT: vec(3)}, study_uid=site_study)
        assert other.prototype_set().composition[0].site_cases == 7
    # served with the shipped embedding again: its own cases, as before
    again = store.prototype_set()
    assert again.labels == before.labels and again.composition == before.composition
    for modality, array in before.prototypes.items():
        assert np.array_equal(again.prototypes[modality], array)
    with pytest.raises(DuplicateCaseError):
        add(store, "benign", {CT: vec(4)}, study_uid=site_study)


def test_a_store_made_before_cases_recorded_their_embedding_migrates_them_as_version_1s(tmp_path):
    from alembic import command
    from alembic.config import Config

    from cspine.fewshot.store import MIGRATIONS

    url = f"sqlite:///{tmp_path / 'support.db'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO cases (id, study_uid_hash, label, pathology_reference, note, curator, created_at, "
                "synthetic) VALUES (1, 'ab', 'benign', 'biopsy', '', 'dr old', '2026-12-01 10:00:00', 0)"
            )
        )
        conn.execute(text("INSERT INTO case_embeddings VALUES (1, 'CT', :v)"), {"v": vec(5).astype("<f4").tobytes()})
        conn.execute(text("INSERT INTO versions VALUES (1, '2026-12-01 10:00:00', 'dr old', 'add case 1')"))
        conn.execute(text("INSERT INTO version_cases VALUES (1, 1)"))
        conn.execute(text("UPDATE store_head SET version = 1"))
    engine.dispose()
    with SupportStore(url) as store:
        store.migrate()
        (case,) = store.list_cases()
        assert (case.curator, case.embedding, case.in_use) == ("dr old", "", True)
        assert np.allclose(store.prototype_set().prototypes[CT][0], vec(5))


def test_two_replicas_migrating_a_new_database_at_once_both_succeed(url):
    replicas = [SupportStore(url), SupportStore(url)]
    barrier = threading.Barrier(2)
    errors = []

    def migrate(s: SupportStore) -> None:
        try:
            barrier.wait()
            s.migrate()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert [s.current_version() for s in replicas] == [0, 0]
    for s in replicas:
        s.close()


def test_the_database_holds_the_study_uid_hash_never_the_uid(store, url):
    study = uid()
    add(store, "benign", study_uid=study, create_class=True)
    engine = create_engine(url)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT study_uid_hash FROM cases")).scalars().all()
        columns = conn.execute(text("SELECT * FROM cases")).keys()
    engine.dispose()
    assert stored == [study_uid_hash(study)] and len(stored[0]) == 64
    assert study not in stored and "study_uid" not in columns


def test_the_migration_creates_exactly_the_tables_the_store_uses(store, url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert [d for d in differences if d[0] != "remove_table"] == []  # alembic_version is Alembic's own


def test_an_unreachable_postgresql_is_unavailable_without_its_url_and_logged_without_the_password(caplog):
    port = free_port()
    store = SupportStore(f"postgresql+psycopg://cspine:s3cret@127.0.0.1:{port}/cspine")
    with (
        caplog.at_level(logging.WARNING, logger="cspine.fewshot.store"),
        pytest.raises(StoreUnavailableError, match=r"^the support store is unavailable: ") as caught,
    ):
        store.current_version()
    store.close()
    # The client's message names "the support store": no URL, host, port, user or password.
    for part in ("postgresql", "127.0.0.1", str(port), "cspine:", "s3cret"):
        assert part not in str(caught.value)
    # The server's log names the store by its URL, the password hidden.
    assert f"support store postgresql+psycopg://cspine:***@127.0.0.1:{port}/cspine is unavailable" in caplog.text
    assert "s3cret" not in caplog.text


def test_a_sqlite_file_put_back_after_the_store_opened_an_empty_one_in_its_place_is_read_again(tmp_path):
    # An operator moves the database away and back; a call in between opened an empty file at its path.
    path = tmp_path / "support.db"
    with SupportStore(f"sqlite:///{path}") as store:
        store.migrate()
        version = add(store, "benign", create_class=True)
        store.close()  # no pooled connection left: the next call opens the path anew
        path.rename(tmp_path / "moved.db")
        with pytest.raises(StoreUnavailableError, match=r"^the support store is unavailable: "):
            store.current_version()  # SQLite creates an empty file here: no tables
        (tmp_path / "moved.db").rename(path)  # replaces the empty file; a pooled connection would still hold it
        assert store.current_version() == version
