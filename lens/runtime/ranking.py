"""How a run's codes are ranked: by the beam, or by exclusion.

``beam`` (the default) ranks the codes a beam over the corpus's codes kept, by the model's
probability of each.  A query with several relevant documents (LIMIT's pairs have two) often
has the model commit to one of them at the first digit, and then the beam's second code is a
document sharing that digit, not the other relevant one.  ``exclude`` asks the model again:
the first code is the beam's best, and each next one is the best code the model decodes with
the documents ranked so far hidden from the query at every layer (they keep their places, so
no other document's position changes).  Ranking k codes costs k query passes over the corpus.
"""

from __future__ import annotations

from lens.errors import LensError
from lens.runtime.records import QueryRun
from lens.runtime.stream import QueryStream

RANKINGS = ("beam", "exclude")


def check_ranking(ranking: str | None, beam: int) -> str | None:
    """The ranking as records name it (None for the beam's), checked against the beam."""
    if ranking in (None, "beam"):
        return None
    if ranking not in RANKINGS:
        raise LensError(f"ranking {ranking!r}: choose one of {', '.join(RANKINGS)}")
    if beam < 2:
        raise LensError("--ranking exclude hides each decoded document, so every code must be one of the corpus's: "
                        "use --beam 2 or more (a greedy code need not be a corpus's code)")
    return ranking


def run_in_order(runner, streams: list[QueryStream], desc: str | None = None, beam: int = 1) -> list[QueryRun]:
    """Unrouted streams first: a routed one then starts at its route layer, from the states the
    run of its score function alone left (the layers before are the same computation)."""
    runs: list = [None] * len(streams)
    for routed in (False, True):
        which = [i for i, s in enumerate(streams) if (s.route is not None) == routed]
        if which:
            for i, run in zip(which, runner.run_streams([streams[i] for i in which], desc=desc, beam=beam)):
                runs[i] = run
    return runs


def rank_by_exclusion(runner, streams: list[QueryStream], runs: list[QueryRun], k: int, beam: int,
                      desc: str | None = None) -> list[QueryRun]:
    """Each run's ``ranked_codes`` (and ``ranked_logprobs``, each code's log-probability in its
    own pass) re-ranked by exclusion, up to ``k`` codes: the run's best first, then each next
    best with the ones before it hidden.  Each round's passes record nothing; the runs keep the
    first pass's record.  Returns the runs, changed in place."""
    ranked = [[run.ranked_codes[0]] for run in runs]
    logps = [[run.ranked_logprobs[0]] for run in runs]
    for depth in range(1, k):
        todo = [i for i, s in enumerate(streams) if depth < s.n_docs]
        if not todo:
            break
        again = []
        for i in todo:
            s = streams[i]
            where = {runner.pool.codes[d]: p for p, d in enumerate(s.corpus)}
            again.append(runner.stream(s.query_id, s.n_docs, s.intervention, record=False, route_scores=False,
                                       hidden=tuple(where[c] for c in ranked[i])))
        for i, run in zip(todo, run_in_order(runner, again, desc=desc, beam=beam)):
            ranked[i].append(run.ranked_codes[0])
            logps[i].append(run.ranked_logprobs[0])
    for run, codes, lps in zip(runs, ranked, logps):
        run.ranked_codes, run.ranked_logprobs = codes, lps
    return runs
