// libslirp's public header needs no glib; linked directly (`pkg-config slirp` would demand glib-2.0's .pc).
#include <slirp/libslirp.h>
#include <poll.h>
