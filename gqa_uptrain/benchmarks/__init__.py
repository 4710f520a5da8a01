"""Benchmarks run by `gqa-uptrain bench NAME`. Each module defines HELP, add_arguments(parser) and run(args).

Benchmarks measure a baseline in the same run and print ratios; they are never timed tests."""
