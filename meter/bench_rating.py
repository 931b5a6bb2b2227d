"""``meter bench rating``: longest-prefix lookups per second with a big price list loaded.

Pure CPU, no services: a price list of ``prefixes`` random prefixes (2 to 8 digits, a tenth of
them with a second, later version), then ``lookups`` rating calls (``outbound_rate`` with the
call's answered_at, as the hot path does) on random E.164 numbers drawn so that most match a
long prefix. Also times building the list from CSV text, which is what an import parses.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from rating.pricelist_csv import export_csv, parse_csv
from rating.rating import NoRate, PriceList, VoiceRate

_T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def build(prefixes: int, rng: random.Random) -> PriceList:
    pl = PriceList("bench", "USD", VoiceRate("", 3_500), 4_000)
    made: set[str] = set()
    while len(made) < prefixes:
        p = str(rng.randint(1, 9)) + "".join(
            str(rng.randint(0, 9)) for _ in range(rng.randint(1, 7))
        )
        if p in made:
            continue
        made.add(p)
        pl.add_outbound(VoiceRate(p, rng.randint(1_000, 500_000)))
        if rng.random() < 0.1:
            pl.add_outbound(VoiceRate(p, rng.randint(1_000, 500_000), effective_from=_T0))
    return pl


def run_bench_rating(prefixes: int, lookups: int, out: Path | None) -> int:
    rng = random.Random(7)
    t = time.perf_counter()
    pl = build(prefixes, rng)
    build_s = time.perf_counter() - t
    text = export_csv(pl.versions())
    t = time.perf_counter()
    parsed = parse_csv(text, default_from=0)
    parse_s = time.perf_counter() - t
    keys = list(pl.outbound)
    dests = [
        "+" + rng.choice(keys) + "".join(str(rng.randint(0, 9)) for _ in range(12))
        for _ in range(min(lookups, 200_000))
    ]
    dests = [d[:16] for d in dests]
    at = _T0 + 3_600
    lookup = pl.outbound_rate
    misses = 0
    t = time.perf_counter()
    done = 0
    while done < lookups:
        for d in dests[: lookups - done]:
            try:
                lookup(d, at)
            except NoRate:
                misses += 1
        done += min(len(dests), lookups - done)
    elapsed = time.perf_counter() - t
    rate = lookups / elapsed
    print(
        f"bench rating: {prefixes:,} prefixes ({len(parsed):,} rate versions), "
        f"{lookups:,} lookups: {rate:,.0f} lookups/s ({1e6 / rate:.2f} us each), "
        f"{misses} without a rate"
    )
    print(f"  built in {build_s:.2f} s; CSV of every version parsed in {parse_s:.2f} s")
    if out:
        out.write_text(
            json.dumps(
                {
                    "prefixes": prefixes,
                    "versions": len(parsed),
                    "lookups": lookups,
                    "lookups_per_s": round(rate),
                    "csv_parse_s": round(parse_s, 3),
                },
                indent=2,
            )
            + "\n"
        )
    return 0
