"""RESP limits, each with the reason for its value.

The scanner of client commands follows Redis's own request parser (networking.c,
processMultibulkBuffer / processInlineBuffer) wherever Redis accepts bytes, and refuses where
Redis would refuse or keep waiting: the broker must never see a different command boundary
than the server does.
"""

# Redis's PROTO_INLINE_MAX_SIZE: an inline request, or a multibulk header line, longer than
# this is an error there too ("too big inline request").
MAX_INLINE_BYTES = 64 * 1024
# A "*<count>" or "$<length>" line: the longest valid one, "$536870912" or "*-2147483648",
# is 12 bytes; past 32 without its CR it cannot be a number Redis accepts.
MAX_HEADER_LINE = 32
# Redis's proto-max-bulk-len default (512 MiB): a larger bulk is an error there.
MAX_BULK_LENGTH = 512 * 1024 * 1024
# Redis refuses a multibulk count over INT_MAX; 1M arguments is far past any real command
# (MSET of 500k keys) and bounds the work per command header.
MAX_COMMAND_ARGS = 1024 * 1024
# The commands the broker rewrites (AUTH, HELLO, RESET) are read whole before forwarding:
# a password or client name is small; a request this large is refused rather than buffered.
MAX_WATCHED_COMMAND_BYTES = 64 * 1024
# Command names the broker watches are short; a longer first argument is none of them and
# is streamed through without being buffered.
MAX_WATCHED_NAME = 16

# Replies the broker reads itself (AUTH's +OK, errors, a HELLO map) are small. A server that
# sends more during login is not behaving like one.
MAX_REPLY_BULK = 1024 * 1024
MAX_REPLY_ITEMS = 4096
# Nesting of aggregate replies (HELLO's map holds a list of module maps: depth 3).
MAX_REPLY_DEPTH = 16
