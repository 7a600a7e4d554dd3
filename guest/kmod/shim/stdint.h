/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/* pvdma_abi.h includes <stdint.h>; in the kernel the same types come from
 * <linux/types.h>, so the module uses the ABI header unchanged. */
#include <linux/types.h>
