"""Guest-side conventions: the boot layout and the image loader."""
