"""Network definitions: the Stage B/C UNet and Stage A. They depend on specs and checkpoint only."""
