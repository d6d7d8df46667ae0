"""The shipped demo models' provenance: synthetic training images and the script that trains them.

Kept inside ``engines`` so that anyone can regenerate the two demo models byte for byte
(``python -m engines.demo.train``, with the ``train`` extra for torch) and so the tests can
paint the same synthetic findings into real DICOM files. Inference never imports torch.
"""
