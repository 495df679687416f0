"""One module per `vsalmonn-jax` subcommand, each exposing `main(argv: list[str]) -> int`."""
