"""Files: how retrain writes, reads and names files it may not fully control.

atomic_write    atomic, durable writes: the one way a file is replaced
output_folder   one complete run per output folder (staging folder, swap at the end)
run_marker      the run marker that makes a folder retrain's; carrying the rest over
paths           local paths and tf.io.gfile URLs (gs://...) behind one set of calls
regular_file    open_regular: a regular file of bounded size, opened without waiting
received_files  reading back an output folder someone may have sent (no links, bounded)
digests         naming a set of values by a hash
text_escapes    writing names retrain did not choose into text files
"""
