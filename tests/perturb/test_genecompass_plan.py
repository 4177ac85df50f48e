"""GeneCompass perturbation plans: delete drops the (id, value) pair; overexpress raises the value x 1e4 and
re-sorts stably, as GeneCompass's own ``overexpress_index`` does (written out below in its Python form); groups
are raised together; the top gene is a real perturbation; absent genes are skipped."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import UsageError
from scfm_fast.perturb.genecompass import SPECIES_ROW, plan_genecompass_cell


def genecompass_overexpress(ids, values, index):
    """GeneCompass's ``overexpress_index`` for one gene: raise its value x 10000 and ``sorted(..., reverse=True)``."""
    pairs = np.stack([np.asarray(ids), np.asarray(values)], axis=1).tolist()  # float64, as its np.stack
    pairs[index][-1] = pairs[index][-1] * 10000
    pairs = sorted(pairs, key=lambda x: x[1], reverse=True)
    return [int(p[0]) for p in pairs], np.asarray([p[1] for p in pairs], dtype=np.float32)


def variants(plan):
    """``(token ids, values, perturbed tokens, new positions)`` of each variant, species row dropped."""
    out = []
    for b in plan.blocks:
        ids = np.concatenate([plan.input_ids, b.inserted])
        vals = np.concatenate([plan.values, b.inserted_values if b.inserted_values is not None
                               else np.zeros(len(b.inserted), np.float32)])
        for v in range(b.n_variants):
            assert b.src[v][0] == 0  # the species row leads every variant
            out.append((ids[b.src[v][1:]].tolist(), vals[b.src[v][1:]], b.tokens[v].tolist(), b.new_pos[v] - 1))
    return out


@pytest.fixture
def cell():
    # real-looking GeneCompass values with ties (log2 values of small counts repeat)
    ids = np.array([11, 12, 13, 14, 15, 16, 17], dtype=np.int64)
    vals = np.array([3.5, 2.0, 2.0, 1.0, 1.0, 1.0, 0.00005], dtype=np.float32)
    return ids, vals


def test_single_gene_overexpress_equals_genecompass_code(cell):
    ids, vals = cell
    plan = plan_genecompass_cell(ids, vals, 0, species=1, perturbation="overexpress", groups=None,
                                 special_token_ids=[0, 1])
    assert plan.input_ids[0] == SPECIES_ROW and plan.special[0] and plan.species == 1
    got = variants(plan)
    assert len(got) == len(ids)  # the top gene too: its value changes
    for i, (v_ids, v_vals, toks, new) in enumerate(got):
        ref_ids, ref_vals = genecompass_overexpress(ids, vals, i)
        assert v_ids == ref_ids
        np.testing.assert_array_equal(v_vals.view(np.int32), ref_vals.view(np.int32))  # bit for bit
        assert toks == [ids[i]] and ref_ids[new[0]] == ids[i]
    # 0.00005 x 1e4 = 0.5: below the others, the gene stays last (a value sort, not a move to the front)
    assert got[-1][0] == ids.tolist() and got[-1][3].tolist() == [6]


def test_ties_keep_their_order(cell):
    ids, vals = cell
    vals = vals.copy()
    vals[3] = 3.5e-4  # x 1e4 = 3.5: ties with the top gene and goes after it (stable sort)
    plan = plan_genecompass_cell(ids, vals, 0, species=0, perturbation="overexpress", groups=[(14,)],
                                 special_token_ids=[0, 1])
    (v_ids, _, _, new), = variants(plan)
    assert v_ids == [11, 14, 12, 13, 15, 16, 17] and new.tolist() == [1]
    assert v_ids == genecompass_overexpress(ids, vals, 3)[0]


def test_group_raised_together_and_delete_drops_pairs(cell):
    ids, vals = cell
    plan = plan_genecompass_cell(ids, vals, 0, species=0, perturbation="overexpress", groups=[(16, 13)],
                                 special_token_ids=[0, 1])
    (v_ids, v_vals, toks, new), = variants(plan)
    # both raised, one stable sort: 13 (2e4) before 16 (1e4); listed order kept in gene_tokens
    assert v_ids == [13, 16, 11, 12, 14, 15, 17] and toks == [16, 13] and new.tolist() == [1, 0]
    np.testing.assert_array_equal(v_vals[:2], np.float32([2.0 * 1e4, 1.0 * 1e4]))
    plan = plan_genecompass_cell(ids, vals, 0, species=0, perturbation="delete", groups=[(16, 13), (12,)],
                                 special_token_ids=[0, 1])
    got = {tuple(t): (i, v) for i, v, t, _ in variants(plan)}
    i, v = got[(12,)]
    assert i == [11, 13, 14, 15, 16, 17]
    np.testing.assert_array_equal(v, np.delete(vals, 1))
    assert got[(16, 13)][0] == [11, 12, 14, 15, 17]


def test_absent_genes_skipped_and_rank_moves_refused(cell):
    ids, vals = cell
    plan = plan_genecompass_cell(ids, vals, 3, species=0, perturbation="overexpress", groups=[(99,), (11, 98)],
                                 special_token_ids=[0, 1])
    assert plan.n_variants == 0
    assert [r["reason"] for r in plan.skipped] == ["gene not expressed in cell",
                                                   "group members not expressed in cell: [98]"]
    one = plan_genecompass_cell(ids[:1], vals[:1], 3, species=0, perturbation="overexpress", groups=None,
                                special_token_ids=[0, 1])
    assert one.n_variants == 0 and one.skipped[0]["reason"] == "no other gene in cell"
    with pytest.raises(UsageError, match="delete or overexpress"):
        plan_genecompass_cell(ids, vals, 0, species=0, perturbation="inhibit", groups=None, special_token_ids=[])
