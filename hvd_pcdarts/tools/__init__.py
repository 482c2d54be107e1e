"""Tools around a run: the cluster doctor, pictures (plots, cell graphs), the image-folder reader and scan,
evaluation and export of a trained network."""
