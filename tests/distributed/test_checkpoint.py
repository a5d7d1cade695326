"""torch.distributed.checkpoint of model + optimizer under FSDP2 resumes the same trajectory,
on the same number of ranks (bit for bit) and across 1 <-> 2 ranks (within 1e-5).

Per optimizer, inside one 2-process group: an uninterrupted FSDP2 run that saves at step 3 of 6, a
resume from that checkpoint, and a resume from a checkpoint written by a single process. Here, in
one process without a process group: the single-process runs and a resume of the FSDP2 checkpoint.
"""
import warnings

import pytest

import shine
import dist_workers as W

TOL = 1e-5
LABELS = shine.list_optimizers() + ["c-mars-shampoo-exact", "mars-came-exact", "came-last2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dcp"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group here
        single = {label: W.checkpoint_run(label, "single", root, save_tag="single") for label in LABELS}
        sharded = W.launch(W.job_checkpoint, 2, LABELS, root)
        onto_one = {label: W.checkpoint_run(label, "single", root, load_tag="fsdp2") for label in LABELS
                    if not isinstance(sharded[label], str)}
    return single, sharded, onto_one


def _max_rel(a, b):
    assert a.keys() == b.keys()
    return max(W.rel_diff(a[k], b[k]) for k in a)


@pytest.mark.parametrize("label", LABELS)
def test_resume_on_same_ranks_is_identical(runs, label):
    _, sharded, _ = runs
    result = sharded[label]
    assert not isinstance(result, str), result
    straight, resumed = result["straight"], result["resumed"]
    assert all(straight[k].equal(resumed[k]) for k in straight)


@pytest.mark.parametrize("label", LABELS)
def test_resume_across_world_sizes(runs, label):
    single, sharded, onto_one = runs
    result = sharded[label]
    assert not isinstance(result, str), result
    assert _max_rel(result["straight"], single[label]) <= TOL       # FSDP2 run = single-process run
    assert _max_rel(result["from_single"], single[label]) <= TOL    # 1 rank -> 2 ranks
    assert _max_rel(onto_one[label], result["straight"]) <= TOL     # 2 ranks -> 1 rank
