"""Perturbation plans: Geneformer's delete / overexpress / inhibit / activate semantics, targets, skips."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast.perturb.plan import build_variant, plan_cell, target_rank
from scfm_fast.store.cells import open_cells
from scfm_fast.vocab.targets import TargetResolver

from .conftest import CLS, EOS, SPECIAL


def _apply(ids, special_ids, positions, kind, **kw):
    ids = np.asarray(ids)
    src, new = build_variant(np.isin(ids, special_ids), positions, kind, **kw)
    return ids[src].tolist(), new.tolist()


def test_delete_shifts_later_genes_up():
    assert _apply([10, 11, 12, 13], SPECIAL, [1], "delete") == ([10, 12, 13], [-1])
    # V2: <cls>/<eos> stay, the gene after the deleted one moves up
    assert _apply([CLS, 10, 11, 12, EOS], SPECIAL, [2], "delete") == ([CLS, 10, 12, EOS], [-1])
    assert _apply([10, 11, 12, 13], SPECIAL, [0, 3], "delete") == ([11, 12], [-1, -1])


def test_overexpress_moves_to_rank_one_after_cls():
    assert _apply([10, 11, 12, 13], SPECIAL, [2], "overexpress") == ([12, 10, 11, 13], [0])
    assert _apply([CLS, 10, 11, 12, EOS], SPECIAL, [3], "overexpress") == ([CLS, 12, 10, 11, EOS], [1])
    # two genes together: to the front in the order they were listed (Geneformer's overexpress_indices)
    assert _apply([10, 11, 12, 13], SPECIAL, [3, 1], "overexpress") == ([13, 11, 10, 12], [0, 1])
    assert _apply([10, 11, 12, 13], SPECIAL, [1, 3], "overexpress") == ([11, 13, 10, 12], [0, 1])


@pytest.mark.parametrize(("rank", "n", "kind", "q", "expected"), [
    # quartiles of 8 genes: bins {0,1} {2,3} {4,5} {6,7}; middle of bin b is rank 2b+1
    (0, 8, "activate", 0.25, 0), (1, 8, "activate", 0.25, 0), (2, 8, "activate", 0.25, 1),
    (7, 8, "activate", 0.25, 5), (0, 8, "inhibit", 0.25, 3), (5, 8, "inhibit", 0.25, 7),
    (6, 8, "inhibit", 0.25, 7), (0, 8, "inhibit", 0.5, 6), (3, 8, "inhibit", 0.5, 6),
    (4, 8, "inhibit", 0.5, 7), (7, 8, "activate", 0.5, 2), (0, 1, "inhibit", 0.25, 0),
])
def test_quantile_targets(rank, n, kind, q, expected):
    assert target_rank(rank, n, kind, q) == expected


def test_activate_inhibit_permutation_keeps_other_order():
    ids = [10, 11, 12, 13, 14, 15, 16, 17]
    assert _apply(ids, SPECIAL, [7], "activate") == ([10, 11, 12, 13, 14, 17, 15, 16], [5])
    assert _apply(ids, SPECIAL, [0], "inhibit") == ([11, 12, 13, 10, 14, 15, 16, 17], [3])
    v2 = [CLS, *ids, EOS]
    toks, new = _apply(v2, SPECIAL, [1], "inhibit")
    assert toks == [CLS, 11, 12, 13, 10, 14, 15, 16, 17, EOS] and new == [4]
    with pytest.raises(ValueError, match="rank_shift"):
        _apply(ids, SPECIAL, [0], "inhibit", rank_shift=0.0)


def test_plan_all_genes_never_perturbs_specials():
    ids = np.array([CLS, 10, 11, 12, EOS])
    p = plan_cell(ids, 7, perturbation="delete", groups=None, special_token_ids=SPECIAL)
    assert p.n_variants == 3 and len(p.blocks) == 1
    assert p.blocks[0].tokens[:, 0].tolist() == [10, 11, 12]
    assert p.blocks[0].src.tolist() == [[0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4]]


def test_absent_genes_are_skipped_and_reported():
    ids = np.array([10, 11, 12])
    p = plan_cell(ids, 3, perturbation="overexpress", groups=[(11,), (99,), (10, 98)],
                  special_token_ids=SPECIAL)
    assert p.n_variants == 1 and p.blocks[0].tokens.tolist() == [[11]]
    assert [s["gene_tokens"] for s in p.skipped] == [[99], [10, 98]]
    assert all(s["cell_index"] == 3 for s in p.skipped)
    # a special token as target is never perturbed
    p2 = plan_cell(np.array([CLS, 10, EOS]), 0, perturbation="delete", groups=[(CLS,)],
                   special_token_ids=SPECIAL)
    assert p2.n_variants == 0 and p2.skipped


def test_pairs_and_anchor_blocks():
    ids = np.array([10, 11, 12, 13])
    p = plan_cell(ids, 0, perturbation="delete", groups=[(10, 12), (11,)], special_token_ids=SPECIAL)
    assert sorted(b.length for b in p.blocks) == [2, 3]
    pa = plan_cell(ids, 0, perturbation="delete", groups=None, anchor=12, special_token_ids=SPECIAL)
    assert pa.n_variants == 3 and pa.blocks[0].length == 2
    assert all(12 in r for r in pa.blocks[0].tokens.tolist())
    pn = plan_cell(ids, 0, perturbation="delete", groups=None, anchor=99, special_token_ids=SPECIAL)
    assert pn.n_variants == 0 and "anchor" in pn.skipped[0]["reason"]


def test_single_gene_cell_is_skipped_for_every_perturbation():
    p = plan_cell(np.array([10]), 0, perturbation="delete", groups=None, special_token_ids=SPECIAL)
    assert p.n_variants == 0 and p.skipped[0]["reason"] == "cell would have no genes left"
    # a move of a cell's only gene is a no-op with nothing left to pool (its cosine was NaN)
    for kind in ("overexpress", "inhibit", "activate"):
        p = plan_cell(np.array([CLS, 10, EOS]), 0, perturbation=kind, groups=None, special_token_ids=SPECIAL)
        assert p.n_variants == 0 and p.skipped[0]["reason"] == "no other gene in cell"
        p = plan_cell(np.array([10, 11]), 0, perturbation=kind, groups=[(10, 11), (11,)], special_token_ids=SPECIAL)
        assert [10, 11] in [s["gene_tokens"] for s in p.skipped]
        # inhibiting the bottom gene leaves the cell as it was: a no-op, skipped
        assert p.n_variants == (0 if kind == "inhibit" else 1)


@pytest.mark.parametrize(("kind", "genes", "noop"), [
    ("overexpress", [(10,), (12,)], [10]), ("activate", [(10,), (11,), (17,)], [10]),
    ("inhibit", [(17,), (16,), (10,)], [17]), ("overexpress", [(10, 11), (11, 10)], [10, 11]),
])
def test_noop_moves_are_skipped_and_counted(kind, genes, noop):
    ids = np.arange(10, 18)
    p = plan_cell(ids, 5, perturbation=kind, groups=genes, special_token_ids=SPECIAL)
    reasons = [s for s in p.skipped if s["reason"].startswith("no-op")]
    assert [s["gene_tokens"] for s in reasons] == [[t] for t in noop] if len(genes[0]) == 1 else [[10, 11]]
    assert p.n_variants == len(genes) - len(reasons)
    for b in p.blocks:  # no remaining variant is the identity
        assert not (b.src == np.arange(b.length)).all(axis=1).any()


def test_quartile_steps():
    # 8 genes, quartile bins {0,1} {2,3} {4,5} {6,7}: two steps from bin 0 lands in the middle of bin 2
    assert target_rank(0, 8, "inhibit", 0.25, 2) == 5 and target_rank(0, 8, "inhibit", 0.25, 3) == 7
    assert target_rank(4, 8, "inhibit", 0.25, 2) == 7  # past the bottom bin: the last rank
    assert target_rank(7, 8, "activate", 0.25, 2) == 3 and target_rank(7, 8, "activate", 0.25, 3) == 1
    assert target_rank(5, 8, "activate", 0.25, 3) == 0  # past the top bin: the front
    ids = np.arange(10, 18)
    p = plan_cell(ids, 0, perturbation="inhibit", groups=[(10,)], special_token_ids=SPECIAL, steps=2)
    assert ids[p.blocks[0].src[0]].tolist() == [11, 12, 13, 14, 15, 10, 16, 17]
    with pytest.raises(ValueError, match="steps"):
        target_rank(0, 8, "inhibit", 0.25, 0)


def test_anchor_pairs_put_the_anchor_first():
    ids = np.arange(10, 16)
    p = plan_cell(ids, 0, perturbation="overexpress", groups=None, anchor=14, special_token_ids=SPECIAL)
    for b in p.blocks:
        for src, toks in zip(b.src, b.tokens):
            assert toks[0] == 14 and ids[src[0]] == 14 and ids[src[1]] == toks[1]


def test_moves_on_tiny_cells_give_no_nan_rows(model):
    from scfm_fast.perturb import perturb_cells

    cells = [np.array([10]), np.array([11, 12]), np.array([CLS, 13, EOS])]
    for kind in ("overexpress", "inhibit", "activate"):
        df = perturb_cells(cells, model, perturbation=kind, special_token_ids=SPECIAL, progress_bar=False)
        # two genes in quartile bins of width 0.5: only overexpress/activate of the second gene moves it
        assert df["cell_index"].tolist() == ([] if kind == "inhibit" else [1]) and np.isfinite(df["cos_sim"]).all()
        assert {s["cell_index"] for s in df.attrs["skipped"]} == {0, 1, 2}


@pytest.mark.parametrize("q", [0.1, 0.2, 0.3, 0.05])
def test_quantile_bins_are_exact_for_decimal_rank_shifts(q):
    # 0.1 * 8 is 0.8000000000000000444 in floats: rank 4 of 8 fell in decile bin 4 instead of 5
    assert target_rank(4, 8, "inhibit", 0.1) == 5 and target_rank(4, 8, "activate", 0.1) == 3
    assert target_rank(4, 8, "inhibit", np.float32(q)) == target_rank(4, 8, "inhibit", q)  # numpy scalars
    from fractions import Fraction

    qf = Fraction(q).limit_denominator(1000)
    for n in range(1, 120):
        for r in range(n):
            b = min(int(r / (qf * n)), int(1 / qf) + (1 / qf != int(1 / qf)) - 1)
            up = int((b - 1 + Fraction(1, 2)) * qf * n) if b > 0 else 0
            assert target_rank(r, n, "activate", q) == up, (n, r)


def test_resolver_symbols_and_ensembl(geneformer_v1_dir):
    r = TargetResolver(geneformer_v1_dir / "token_dictionary.pkl", geneformer_v1_dir / "gene_name_id_dict.pkl")
    sym, eid = next((s, e) for s, e in r.name_map.items() if e in r.token_dict)
    tok = int(r.token_dict[eid])
    assert r.resolve_one(sym) == tok
    assert r.resolve_one(eid) == tok
    assert r.resolve_one(f"{eid}.7") == tok
    assert r.resolve_one(tok) == tok and r.resolve_one(str(tok)) == tok
    assert r.resolve_one("NOT_A_GENE_XYZ") is None
    groups, unknown = r.resolve([sym, (eid, tok), "NOT_A_GENE_XYZ"])
    assert groups == [(tok,), (tok, tok)] and unknown == ["NOT_A_GENE_XYZ"]
    assert r.resolve([sym, tok + 1], combine=True)[0] == [(tok, tok + 1)]
    assert r.special_token_ids() == [0, 1]


def test_bundled_dictionaries_are_the_default():
    r = TargetResolver()
    assert r.resolve("all") == (None, [])
    assert r.ensembl_of()[2].startswith("ENSG")


def test_cells_come_from_open_cells(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [np.array([5, 6, 7]), np.array([9])]
    t = pa.table({"input_ids": pa.array([c.tolist() for c in cells], pa.list_(pa.int32())),
                  "length": pa.array([3, 1], pa.int32()), "cell_index": pa.array([40, 41], pa.int64())})
    pq.write_table(t, tmp_path / "part-0.parquet")
    for src in (tmp_path / "part-0.parquet", t):
        got = list(open_cells(src).iter_cells())
        assert [g[0] for g in got] == [40, 41]
        assert [g[1].tolist() for g in got] == [c.tolist() for c in cells]
    assert [i for i, _ in open_cells(cells).iter_cells()] == [0, 1]
