"""Reading records from files and datasets, detecting their formats, chat templates and label masks, packing."""
