/*
 * CUring: ABI only. liburing, plus the project's own copy of the ublk UAPI
 * (CUringUblk.h), plus small inline helpers for what Swift cannot reach
 * (CUringHelpers.h). No policy lives here: no retries, no error strings, no
 * defaults. This is the module's umbrella header: a header added to include/
 * must be included here.
 */
#ifndef CURING_H
#define CURING_H

/* Each includes the system headers it needs. */
#include "CUringUblk.h"
#include "CUringHelpers.h"

#endif
