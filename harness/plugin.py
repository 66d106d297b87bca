"""pytest plugin (entry point `relay_harness`): fixtures for the upstream and lab test hosts."""
