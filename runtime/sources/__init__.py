"""Frame sources beside OpenCV's (runtime/capture.py holds the grabber and the OpenCV / folder sources).

Each source implements capture's ``_Source`` interface (``open``, ``read``, ``close``, ``describe``; ``paced``) and is
chosen by the camera config's ``source.kind`` in :meth:`runtime.capture.FrameGrabber._make_source`.
"""
