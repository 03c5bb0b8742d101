"""The VMM side, apart from KVM's vCPU (as Firecracker keeps its legacy devices): boot layout, loader, port devices."""
