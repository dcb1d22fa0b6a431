"""AdAGeo's tables as commands: every run a config, every table the paper's layout (Berton et al., WACV 2021).

    python -m jaxvpr.experiments adageo-table2   [--config configs/adageo_demo.py] [--domains night]
                                                 [--seeds 0,1,2] [--workdir workdir/experiments]
                                                 [--set train.epochs=3 --set ...] [--dry-run]
    python -m jaxvpr.experiments adageo-ablation ...     Table 3: the 8 combinations of DDDA, Att, DA
    python -m jaxvpr.experiments adageo-shots ...        Fig. 5b: AdAGeo with 0, 1, 5, 50 and all target images

Each run is ``--config`` (an ``adageo`` config: ``configs/adageo_demo.py`` on the synthetic city,
``configs/adageo_svox.py`` on SVOX + RobotCar) with the method's switches, the domain and the seed set,
trained in ``<workdir>/<experiment>/<domain>/<method>/seed<k>``. A finished run (its ``results.json``) is
reused and a killed one resumes, so a table can be built over several sessions; runs of one domain,
seed and shot count share their phase 1 (the same DDDA config: the first run's ``ddda/`` folder is linked
into the others). ``--methods 1,3`` runs some rows only. The table prints
test R@1 at 25 m as mean +- std over the seeds per domain and the average over domains, like the
paper's; ``table.md`` and ``table.json`` beside the runs keep it.

Table 2's rows that jaxvpr builds: NetVLAD (source only), NetVLAD + GRL with all target images
(2 domains), AdAGeo (5 shots: DDDA + attention + 3-domain GRL). Its other rows (other methods, the
AlexNet backbone) need code or weights that are not public (recipes_facts §A.2.1).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from jaxvpr import cli


@dataclasses.dataclass(frozen=True)
class Method:
    label: str
    ddda: bool
    attention: bool
    grl: bool
    n_target: int = 5

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.label.lower()).strip("_")


TABLE2 = (
    Method("NetVLAD", ddda=False, attention=False, grl=False),
    Method("NetVLAD + GRL (all target images)", ddda=False, attention=False, grl=True, n_target=-1),
    Method("AdAGeo (5 shots)", ddda=True, attention=True, grl=True),
)
ABLATION = tuple(
    Method(" + ".join(n for n, on in zip(("DDDA", "Att", "DA"), flags) if on) or "none (NetVLAD)",
           ddda=flags[0], attention=flags[1], grl=flags[2])
    for flags in itertools.product((False, True), repeat=3))
SHOTS = tuple(Method(f"AdAGeo, {'all' if n < 0 else n} target images", ddda=True, attention=True, grl=True,
                     n_target=n) for n in (0, 1, 5, 50, -1))
EXPERIMENTS = {"adageo-table2": TABLE2, "adageo-ablation": ABLATION, "adageo-shots": SHOTS}


def run_config(base, method: Method, domain: str, seed: int, overrides: list[str]):
    """The config of one run: ``base`` with the method's switches, the domain and the seed."""
    from ml_collections import ConfigDict

    c = ConfigDict(base.to_dict())
    c.seed = int(seed)
    c.adageo.domain = domain
    if c.data.synthetic_preset:
        c.data.synthetic_domains = domain
    c.adageo.ddda, c.adageo.grl, c.adageo.n_target = method.ddda, method.grl, int(method.n_target)
    name = str(c.model.name).removesuffix("_noatt")
    c.model.name = name if method.attention else f"{name}_noatt"
    c.adageo.compare = ""
    for item in overrides:
        apply_override(c, item)
    return c


def apply_override(config, item: str) -> None:
    """``field.sub=value`` with the value parsed as the field's type; an unknown field is an error."""
    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item!r}: write field=value, e.g. --set train.epochs=3")
    *path, last = key.strip().split(".")
    node = config
    for part in path:
        if part not in node:
            raise SystemExit(f"--set {item!r}: the config has no field {key!r}")
        node = node[part]
    if last not in node:
        raise SystemExit(f"--set {item!r}: the config has no field {key!r}")
    current = node[last]
    if isinstance(current, bool):
        value = text.strip().lower() in ("1", "true", "yes")
    elif isinstance(current, (int, float)):
        value = type(current)(float(text)) if isinstance(current, int) else float(text)
    else:
        value = text
    node[last] = value


def recall_at_1(results: dict) -> float:
    test = results["test"]
    key = next(iter(test))
    return float(test[key]["results"][0]["recall"]["1"])


def format_table(title: str, methods, domains: list[str], cells: dict) -> str:
    """Rows = methods, columns = domains + average: R@1 mean +- std over seeds (paper's Table 2 layout)."""
    width = max(len(m.label) for m in methods) + 2
    head = f"| {'method':<{width}} | " + " | ".join(f"{d:>13}" for d in domains) + f" | {'average':>13} |"
    lines = [f"### {title}", "", head, "|" + "-" * (width + 2) + "|" + "|".join("-" * 15 for _ in domains) + "|" + "-" * 15 + "|"]
    for m in methods:
        row, means = [], []
        for d in domains:
            values = cells.get((m.label, d), [])
            if values:
                row.append(f"{np.mean(values):6.1f} ± {np.std(values):4.1f}")
                means.append(np.mean(values))
            else:
                row.append(f"{'-':>13}")
        avg = f"{np.mean(means):6.1f}" if len(means) == len(domains) else "-"
        lines.append(f"| {m.label:<{width}} | " + " | ".join(f"{c:>13}" for c in row) + f" | {avg:>13} |")
    return "\n".join(lines)


@cli.command
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m jaxvpr.experiments", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--config", default="configs/adageo_demo.py", help="the base adageo config")
    parser.add_argument("--domains", default="night", help="comma-separated target domains")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default="workdir/experiments")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override for every run (repeatable)")
    parser.add_argument("--methods", default="", help="comma-separated row numbers (1 = first row); default all")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their workdirs, train nothing")
    args = parser.parse_args(argv)

    from jaxvpr.train.baseline import load_config_file

    base = load_config_file(args.config)
    if base.recipe != "adageo":
        raise SystemExit(f"--config {args.config}: an adageo config is needed (recipe {base.recipe!r}).")
    methods = EXPERIMENTS[args.experiment]
    if args.methods:
        try:
            methods = tuple(methods[int(i) - 1] for i in args.methods.split(",") if i.strip())
        except (ValueError, IndexError):
            raise SystemExit(f"--methods {args.methods!r}: row numbers 1..{len(methods)} of {args.experiment}, "
                             "e.g. --methods 1,3") from None
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    root = Path(args.workdir) / args.experiment
    cells: dict[tuple[str, str], list[float]] = {}
    phase1: dict[tuple[str, int, int], Path] = {}  # (domain, seed, shots) -> the first run's ddda/ folder
    for domain, method, seed in itertools.product(domains, methods, seeds):
        workdir = root / domain / method.slug / f"seed{seed}"
        config = run_config(base, method, domain, seed, args.set)
        done = workdir / "results.json"
        if method.ddda and not args.dry_run:
            shared = phase1.setdefault((domain, seed, int(config.adageo.n_target)), workdir / "ddda")
            if shared != workdir / "ddda" and (shared / "results.json").is_file() and not (workdir / "ddda").exists():
                workdir.mkdir(parents=True, exist_ok=True)
                (workdir / "ddda").symlink_to(shared.absolute(), target_is_directory=True)
        print(f"== {method.label}, {domain}, seed {seed}: {workdir}" + (" (done)" if done.is_file() else ""),
              flush=True)
        if args.dry_run:
            continue
        if not done.is_file():
            from jaxvpr.train import train

            workdir.mkdir(parents=True, exist_ok=True)
            train(config, workdir)
        cells.setdefault((method.label, domain), []).append(recall_at_1(json.loads(done.read_text())))
    if args.dry_run:
        return 0
    title = (f"{args.experiment}: test R@1 (%) at 25 m, mean ± std over seeds {args.seeds} "
             f"({Path(args.config).name})")
    table = format_table(title, methods, domains, cells)
    print("\n" + table + "\n", flush=True)
    (root / "table.md").write_text(table + "\n")
    (root / "table.json").write_text(json.dumps(
        {"experiment": args.experiment, "config": args.config, "seeds": seeds, "domains": domains,
         "R@1": {f"{m}|{d}": v for (m, d), v in cells.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
