"""``radstream models``: the installed model cards, the backends this machine offers, and
TensorRT plans built ahead of time.

A model is a card and an ONNX file in ``ai.models_dir`` (no code); this command shows
what the AI stage will load, each card validated exactly as the stage validates it, so a
broken card is found before a deployment. ``--build-plans`` parses, builds and caches a
TensorRT plan of every model (keyed by model hash + TensorRT version + GPU compute
capability); the AI stage and a second run reuse the cached plan instead of rebuilding.
TensorRT for RTX builds plans on a machine without a GPU, so an image can ship them.
"""

from __future__ import annotations

import time

import click


def register(cli: click.Group, config_option, settings_of, to_json) -> None:
    @cli.command()
    @config_option
    @click.option("--build-plans", is_flag=True, help="build (or reuse) a TensorRT plan of every model")
    @click.option("--json", "as_json", is_flag=True, help="print JSON")
    @click.pass_context
    def models(ctx: click.Context, build_plans: bool, as_json: bool) -> int:
        """List model cards and inference backends; optionally build TensorRT plans."""
        from engines import available_backends
        from engines.card import CardError, default_models_dir, load_cards

        from adapters.telemetry import configure_logging

        settings = settings_of(ctx)
        configure_logging(settings, "models")  # logs to stderr: stdout is the report
        directory = settings.ai.models_dir or default_models_dir()
        try:
            cards = load_cards(directory)
        except CardError as exc:
            raise click.ClickException(str(exc)) from None
        backends = available_backends()
        report = {
            "models_dir": str(directory),
            "backend_setting": settings.ai.backend,
            "backends": {name: reason or "available" for name, reason in backends.items()},
            "models": [{"name": c.name, "version": c.version, "modalities": list(c.applicability.modalities),
                        "labels": [label.name for label in c.labels], "sha256": c.sha256,
                        "not_for_clinical_use": c.not_for_clinical_use} for c in cards],
        }
        if build_plans:
            from engines.tensorrt import build_plan, flavour

            cache = settings.ai.plan_cache_dir or settings.data_dir.resolve() / "trt-plans"
            report["plans"] = []
            for card in cards:
                started = time.monotonic()
                if not as_json:
                    click.echo(f"building TensorRT ({flavour().backend}) plan of {card.name} ...", err=True)
                plan = build_plan(card, cache)
                report["plans"].append({"model": card.name, "path": str(plan.path), "target": plan.target,
                                        "built": plan.built, "bytes": plan.path.stat().st_size,
                                        "seconds": round(time.monotonic() - started, 3)})
        if as_json:
            click.echo(to_json(report))
            return 0
        click.echo(f"model cards in {report['models_dir']}:")
        for m in report["models"]:
            flag = "  NOT FOR CLINICAL USE" if m["not_for_clinical_use"] else ""
            click.echo(f"  {m['name']} {m['version']}  {'/'.join(m['modalities'])}  labels {', '.join(m['labels'])}{flag}")
        click.echo(f"backends (setting: {report['backend_setting']}):")
        for name, state in report["backends"].items():
            click.echo(f"  {name}: {state}")
        for plan in report.get("plans", []):
            verb = "built" if plan["built"] else "reused"
            click.echo(f"plan {verb}: {plan['path']} ({plan['bytes']} bytes, target {plan['target']}, "
                       f"{plan['seconds']} s)")
        return 0
