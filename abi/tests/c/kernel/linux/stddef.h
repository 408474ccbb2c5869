/* Stand-in for the Linux kernel's <linux/stddef.h> in the header test (offsetof). */
#ifndef TEST_LINUX_STDDEF_H
#define TEST_LINUX_STDDEF_H
#define offsetof(type, member) __builtin_offsetof(type, member)
#endif
