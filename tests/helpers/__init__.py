"""Support shared by the tests of one topic across tests/unit, tests/integration and tests/distributed."""
