"""`ufo` commands that live in their own modules.

Each module here defines `register(app: typer.Typer) -> None`, which adds its commands (or a
sub-app) to the `ufo` app; `ufo.cli` imports every module of this package at start-up. Use
`ufo.cli.friendly`, `console` and the shared options from `ufo.cli` inside `register`, e.g.

    def register(app):
        from ufo.cli import console, friendly

        @app.command()
        @friendly
        def distill(...): ...
"""
