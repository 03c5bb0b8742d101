"""Guest programs: the bundled guests' catalog and the C guest SDK's build (the boot protocol is in vmm/)."""
