"""Generated code for the memctl.v1 wire contract (scripts/gen_protos.py); do not edit."""
