"""`pipeline test`: rule tests in `*.test.yaml` files beside a config, run on the processors only."""
